"""Reward-noise injectors: the ``NOISE`` registry and one class per injector.

An injector corrupts the TRAINING rewards of one batch; evaluation always uses clean graders.
Each class declares what the grammar in ``noise.spec`` needs to parse and validate it:

    name          registry key, also the text of a setting (``flip`` in ``flip0.2``)
    takes_param   whether the name must be followed by a number
    param_symbol  letter shown in usage strings (``flipP``)
    param_range   inclusive (low, high) bounds of the number
    param_integer whether the number must be a whole number (e.g. a future ``pseudoK``)

Adding an injector is one class with ``@injector("name")``, in this module or in a new module of the
``noise`` package (the package imports all of them); the parser does not change.

Registered: ``none``, ``flipP``, ``fpP``, ``fnP`` (binary label noise), ``rmP`` (a simulated reward
model whose errors fall on long responses), ``gaussS`` (additive Gaussian), ``lengthC`` (length
bias) and ``pseudoK`` (majority-vote pseudo-labels from the initial policy); in ``noise.verifiers``
the simulated verifiers whose errors follow features of the answer, ``weak_rmP`` (a weak reward
model of accuracy P), ``form_fnP`` (a rule verifier missing right answers in unusual forms) and
``near_fpP`` (one rewarding near misses); in ``noise.correction`` the positive control
``corrected`` (the backward-corrected reward for the known rates of the injectors before it).

Pseudo-labels need the trainer once, before step 1: an injector whose ``needs_labels()`` returns
K > 0 receives, through ``set_labels(votes)``, K (answer, right) pairs sampled from the initial
policy for every problem that training will draw (``Suite.vote``: the answer as the suite's
grader reads it, and 1.0 when it equals the gold one); at each step ``NoiseContext.regrade``
grades a sample's response against the pseudo-label instead of the gold answer.

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

from harness.errors import HarnessError
from harness.registry import Registry
from harness.seeding import uniform

NOISE: Registry[type["Injector"]] = Registry("noise")


@dataclass(frozen=True)
class NoiseContext:
    """Where a batch of rewards comes from; everything an injector may seed or scale by.

    ``prompt_ids[i]`` and ``sample_idx[i]`` identify sample ``i`` (its problem and its index
    within the problem's group of G samples); both have the batch length N.
    ``response_lengths[i]`` is sample i's response length in tokens and ``max_length`` the
    generation limit (``rmP`` and ``lengthC`` need them). ``regrade(i, gold)`` grades sample i's
    response with the suite's grader against ``gold`` in place of the problem's answer
    (``pseudoK`` needs it). ``responses[i]`` is sample i's response text, ``golds[i]`` its
    problem's gold answer and ``extract`` the suite's answer extraction (``Suite.extract_answer``):
    the simulated verifiers (``weak_rmP``, ``form_fnP``, ``near_fpP``) read answer features from them.
    """

    seed: int
    step: int
    prompt_ids: list[str]
    sample_idx: list[int]
    response_lengths: list[int] | None = None
    max_length: int | None = None
    regrade: Callable[[int, str], float] | None = None
    responses: list[str] | None = None
    golds: list[str] | None = None
    extract: Callable[[str], str | None] | None = None


class Injector:
    """Base class. Subclasses set the class attributes below and implement ``_apply``."""

    name: ClassVar[str] = ""
    takes_param: ClassVar[bool] = False
    param_symbol: ClassVar[str] = "P"
    param_range: ClassVar[tuple[float, float]] = (0.0, math.inf)
    param_integer: ClassVar[bool] = False
    must_be_last: ClassVar[bool] = False  # the parser refuses an injector after it in a composition

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

    def needs_labels(self) -> int:
        """K when the injector needs K samples per problem from the initial policy, else 0."""
        return 0

    def channel_rates(self) -> tuple[float, float] | None:
        """(fp, fn) when the injector is a binary channel with known class-conditional rates: the
        expected fraction of wrong answers it rewards and of right answers it unrewards. None when
        its rates are not known in advance (they depend on the batch or it is not binary)."""
        return None

    def follow(self, before: tuple["Injector", ...]) -> None:
        """Called by the parser with the injectors that come before this one in its composition
        (left to right); an injector that acts on what they did checks and keeps them here."""

    def set_labels(self, votes: dict[str, list[tuple[str | None, float]]]) -> None:
        """Receive, per problem id, K (extracted answer or None, 1.0 when it equals the gold) pairs."""
        raise NotImplementedError(f"noise {self.name!r} takes no pseudo-labels")

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


def _check_binary(rewards: torch.Tensor, name: str) -> None:
    binary = (rewards == 0) | (rewards == 1)
    if not bool(binary.all()):
        bad = rewards[~binary][:3].tolist()
        raise ValueError(f"{name} noise needs binary 0/1 rewards, got values such as {bad}")


def _needs(ctx: NoiseContext, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(ctx, f) is None]
    if missing:
        raise ValueError(f"{name} noise needs NoiseContext.{', '.join(missing)}")


def _rate(hit: torch.Tensor, among: torch.Tensor) -> float:
    """Fraction of the ``among`` samples that are ``hit`` (bool [N] each); 0.0 when none are eligible."""
    n = int(among.sum())
    return float((hit & among).sum()) / n if n else 0.0


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

    def channel_rates(self):
        return float(self.param), float(self.param)

    def _apply(self, rewards, ctx):
        _check_binary(rewards, self.name)
        flip = self.uniforms(ctx) < float(self.param)
        noisy = torch.where(flip.to(rewards.device), 1 - rewards, rewards)
        rate = float(flip.double().mean()) if len(flip) else 0.0
        return noisy, {"flip_rate": rate}


@injector("fp")
class FalsePositive(Injector):
    """One-sided label noise: a wrong answer (r = 0) is rewarded (r <- 1) with probability P.

    Correct answers are never touched. ``fp_rate`` is the fraction of this batch's wrong answers
    that were rewarded (0.0 when the batch has none), an estimate of P.
    """

    takes_param = True
    param_symbol = "P"
    param_range = (0.0, 1.0)

    @classmethod
    def describe(cls) -> str:
        return "false positives: reward each wrong answer (0 -> 1) with probability P in [0, 1]; right answers untouched"

    def channel_rates(self):
        return float(self.param), 0.0

    def _apply(self, rewards, ctx):
        _check_binary(rewards, self.name)
        wrong = (rewards == 0).cpu()
        hit = (self.uniforms(ctx) < float(self.param)) & wrong
        noisy = torch.where(hit.to(rewards.device), torch.ones_like(rewards), rewards)
        return noisy, {"fp_rate": _rate(hit, wrong)}


@injector("fn")
class FalseNegative(Injector):
    """One-sided label noise: a right answer (r = 1) goes unrewarded (r <- 0) with probability P.

    Wrong answers are never touched. ``fn_rate`` is the fraction of this batch's right answers
    that lost their reward (0.0 when the batch has none), an estimate of P.
    """

    takes_param = True
    param_symbol = "P"
    param_range = (0.0, 1.0)

    @classmethod
    def describe(cls) -> str:
        return "false negatives: unreward each right answer (1 -> 0) with probability P in [0, 1]; wrong answers untouched"

    def channel_rates(self):
        return 0.0, float(self.param)

    def _apply(self, rewards, ctx):
        _check_binary(rewards, self.name)
        right = (rewards == 1).cpu()
        hit = (self.uniforms(ctx) < float(self.param)) & right
        noisy = torch.where(hit.to(rewards.device), torch.zeros_like(rewards), rewards)
        return noisy, {"fn_rate": _rate(hit, right)}


@injector("gauss")
class Gauss(Injector):
    """Additive Gaussian noise for continuous rewards: r_i <- r_i + S * std(r) * z_i, z_i ~ N(0, 1).

    ``std(r)`` is the population standard deviation of the batch's incoming rewards (divisor N),
    so the noise is S times the spread of the signal. **A batch whose rewards are all equal (std
    0, including a batch of one) is returned unchanged**: the formula gives zero noise, and
    inventing a scale (e.g. 1) would inject noise of arbitrary size relative to a reward that
    carries no within-batch signal anyway. ``z_i = Phi^-1(u_i)`` from the sample's seeded
    uniform, so all levels S share their z (``gauss0.5`` adds exactly twice ``gauss0.25``'s noise).

    Stats: ``gauss_sigma`` = S * std(r), the noise scale applied; ``gauss_rel_std`` = the
    realised standard deviation of the added noise over std(r) (an estimate of S; 0 when std(r) = 0).
    """

    takes_param = True
    param_symbol = "S"
    param_range = (0.0, math.inf)

    @classmethod
    def describe(cls) -> str:
        return "additive Gaussian noise N(0, (S * batch reward std)^2), S >= 0; a batch with std 0 is left unchanged"

    def _apply(self, rewards, ctx):
        if rewards.numel() == 0:
            return rewards.clone(), {"gauss_sigma": 0.0, "gauss_rel_std": 0.0}
        std = float(rewards.double().std(unbiased=False))
        u = self.uniforms(ctx).clamp(min=2.0**-64)  # uniform() may return exactly 0 -> Phi^-1 = -inf
        noise = float(self.param) * std * torch.special.ndtri(u)
        noisy = (rewards.double() + noise.to(rewards.device)).to(rewards.dtype)
        rel = float(noise.std(unbiased=False)) / std if std > 0 else 0.0
        return noisy, {"gauss_sigma": float(self.param) * std, "gauss_rel_std": rel}


@injector("length")
class LengthBias(Injector):
    """A hackable length bias: r_i <- r_i + C * len_i / L_max (L_max = the generation limit).

    Deterministic (no random draw). Stat ``length_bonus`` = the batch mean of the added C * len / L_max.
    """

    takes_param = True
    param_symbol = "C"
    param_range = (0.0, math.inf)

    @classmethod
    def describe(cls) -> str:
        return "length bias: add C * response length / max length (C >= 0), a bonus a policy can hack"

    def _apply(self, rewards, ctx):
        _needs(ctx, self.name, "response_lengths", "max_length")
        lengths = torch.tensor(ctx.response_lengths, dtype=torch.float64)
        bonus = float(self.param) * lengths / float(ctx.max_length)
        noisy = (rewards.double() + bonus.to(rewards.device)).to(rewards.dtype)
        return noisy, {"length_bonus": float(bonus.mean()) if len(bonus) else 0.0}


def length_error_probs(lengths: torch.Tensor, p: float) -> torch.Tensor:
    """rmP's per-sample error probabilities: lengths [N] -> e [N] in [0, 1], mean exactly 1 - p.

    u_i = (midrank_i - 1/2) / N is sample i's length percentile within the batch (ties share
    their mean rank, so equal lengths get equal error probabilities, and mean(u) = 1/2). Then

        p >= 1/2:  e_i = 2 (1 - p) u_i             (0 for the shortest, up to ~2(1-p) for the longest)
        p <  1/2:  e_i = 1 - 2 p (1 - u_i)         (the mirror image: agreement 2 p (1 - u_i))

    Both are increasing in length, stay in [0, 1] and average exactly 1 - p; they agree at p = 1/2.
    """
    n = lengths.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    x = lengths.double()
    ordered = torch.sort(x).values
    below = torch.searchsorted(ordered, x, right=False).double()  # [N] samples strictly shorter
    not_above = torch.searchsorted(ordered, x, right=True).double()  # [N] samples no longer (self included)
    u = (below + not_above) / (2 * n)  # (midrank - 1/2) / N with midrank = (below + not_above + 1) / 2
    if p >= 0.5:
        return 2 * (1 - p) * u
    return 1 - 2 * p * (1 - u)


@injector("rm")
class RewardModel(Injector):
    """A simulated reward model that agrees with the true (binary) grader with accuracy P.

    It disagrees (r <- 1 - r) on sample i with probability e_i (``length_error_probs``), which
    grows linearly with the response's length percentile in the batch and averages exactly 1 - P
    over the batch: the errors fall on long answers (a proxy for hard ones, where real reward
    models are least reliable), unlike ``flipP``'s uniform errors at the same rate. At P = 1
    it is the grader; at P = 0.5 the longest answers are judged at chance or worse.
    Stat ``rm_acc`` = the realised agreement with the grader in this batch (estimates P).
    """

    takes_param = True
    param_symbol = "P"
    param_range = (0.0, 1.0)

    @classmethod
    def describe(cls) -> str:
        return "simulated reward model agreeing with the grader with accuracy P in [0, 1], errors on the longest responses"

    def _apply(self, rewards, ctx):
        _check_binary(rewards, self.name)
        _needs(ctx, self.name, "response_lengths")
        error = length_error_probs(torch.tensor(ctx.response_lengths), float(self.param))
        wrong = self.uniforms(ctx) < error
        noisy = torch.where(wrong.to(rewards.device), 1 - rewards, rewards)
        return noisy, {"rm_acc": 1.0 - float(wrong.double().mean()) if len(wrong) else 1.0}


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent answer, None entries (no answer extracted) not voting.

    Ties go to the answer that appeared first in ``answers`` (the seeded sampling order), so the
    vote is deterministic. None when no sample gave an answer.
    """
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dicts keep first-appearance order
    if not counts:
        return None
    return max(counts, key=lambda a: counts[a])  # max keeps the first of equal counts


@injector("pseudo")
class PseudoLabel(Injector):
    """The papers' natural noise: each problem's gold answer is replaced by the majority vote of K
    samples from the INITIAL policy (TTRL-style self-labelling), and training rewards grade the
    response against that pseudo-label (``NoiseContext.regrade``).

    The trainer samples the K answers once, before step 1, for the problems training will draw,
    and hands them over with ``set_labels``: each vote is the answer as the suite's grader reads
    it (``Suite.extract_answer``, so "is 12" and "12" vote together on ``arith``) and whether that
    answer equals the gold one (``Suite.answer_correct``). A problem where no sample gave an answer
    has no label: its responses get reward 0. A label is correct when it equals the gold answer
    (its voters' second element). ``pseudo_label_acc`` = the fraction of this batch's samples
    whose problem has a correct label. The incoming rewards are replaced, so
    ``pseudo`` must come first in a composition (``pseudo8+flip0.1``).
    """

    takes_param = True
    param_symbol = "K"
    param_range = (1, math.inf)
    param_integer = True

    def __init__(self, param: float | None = None, position: int = 0):
        if position != 0:
            raise HarnessError("noise 'pseudo' replaces the reward, so it must come first in a composition "
                               "(e.g. 'pseudo8+flip0.1')")
        super().__init__(param, position)
        self.labels: dict[str, str | None] | None = None
        self.label_correct: dict[str, bool] = {}

    @classmethod
    def describe(cls) -> str:
        return "pseudo-labels: gold answer replaced by the majority vote of K >= 1 samples from the initial policy"

    def needs_labels(self) -> int:
        return int(self.param)

    def set_labels(self, votes):
        self.labels, self.label_correct = {}, {}
        for pid, pairs in votes.items():
            label = majority_vote([a for a, _ in pairs])
            self.labels[pid] = label
            self.label_correct[pid] = label is not None and any(a == label and g >= 1.0 for a, g in pairs)

    def _apply(self, rewards, ctx):
        if self.labels is None:
            raise ValueError("pseudo noise has no labels: set_labels() must be called before training")
        _needs(ctx, self.name, "regrade")
        missing = sorted({pid for pid in ctx.prompt_ids if pid not in self.labels})
        if missing:
            raise ValueError(f"pseudo noise has no label for problems {missing[:3]}")
        labels = [self.labels[pid] for pid in ctx.prompt_ids]
        noisy = torch.tensor([0.0 if lab is None else float(ctx.regrade(i, lab)) for i, lab in enumerate(labels)],
                             dtype=rewards.dtype, device=rewards.device)
        correct = [self.label_correct[pid] for pid in ctx.prompt_ids]
        return noisy, {"pseudo_label_acc": sum(correct) / len(correct) if correct else 0.0}

