"""Simulated verifiers whose errors follow features of the answer, as real ones' do.

A learned reward model does not err at random: it is fooled by long answers and by wrong answers
that look like the right one, and it doubts right answers written in an unusual form. A rule-based
math verifier misses right answers in a form it does not parse (about 14 % of them in the papers'
audits) and accepts some near misses. Three injectors model this on any suite, from features of
each sample's answer (``answer_features``) that need no model:

    length      response length / generation limit, in [0, 1]
    unusual     how far the answer's form is from the gold's: 1.0 when the answer the suite's
                grader reads (``Suite.extract_answer``) is missing or written otherwise than the gold
                answer (the gold's own extraction): "0.5" for a gold "\\frac{1}{2}", an unboxed
                answer; 0.5 when it is the gold's but the response wraps it in other text ("is 12",
                "The answer is \\boxed{5}"); 0.0 for a response that is the answer as the gold writes it
    closeness   how near a wrong answer is to the gold one, in [0, 1]: 1 - |a - g| / max(1, |g|)
                (floored at 0) when both read as numbers, else difflib's similarity ratio of the
                two strings; 0.0 without an answer

Each injector turns features into per-sample error weights and spreads its stated error rate over
the eligible samples in proportion to them (``allocate_errors``: capped at 1, the mean over the
eligible samples exactly the rate), then draws one seeded uniform per (step, prompt, sample):

    weak_rmP    a weak reward model of accuracy P: every sample errs; a right answer's weight is
                FLOOR + unusual + length, a wrong answer's FLOOR + closeness + length; the errors
                average exactly 1 - P over the batch (the papers' reward model: P = 0.72)
    form_fnP    a rule verifier's false negatives: right answers lose their reward at rate P
                (e.g. 0.14), weight FLOOR + unusual, so answers in an unusual form are missed first
    near_fpP    false positives on near misses: wrong answers are rewarded at rate P, weight
                FLOOR + closeness, so the near misses are rewarded first

FLOOR = 0.1 keeps every eligible sample able to err (an all-usual batch errs uniformly). Like
``rmP``'s, the error probabilities are relative to the batch; the draws are not. ``form_fnP`` and
``near_fpP`` err at exactly P over their class in expectation, so the positive control
(``corrected``) can use their rates when they come first in a composition (they pick their errors
by the answer, so after another channel their rates are not the composition's: a right answer that
``form_fn`` unrewarded is the nearest of near misses); ``weak_rmP``'s class-conditional rates
depend on the batch.
"""
from __future__ import annotations

import difflib
import math

import torch

from noise.injectors import Injector, NoiseContext, _check_binary, _needs, _rate, injector

FLOOR = 0.1


def allocate_errors(weights: torch.Tensor, rate: float) -> torch.Tensor:
    """weights [N] >= 0 -> error probabilities [N] in [0, 1] proportional to the weights where
    below 1, with mean exactly ``rate`` (in [0, 1]).

    Water-filling: the probabilities rate * N * w / sum(w) that exceed 1 are set to 1 and the rest
    of the budget is spread again over the others in proportion to their weights, until none
    exceeds 1. A set of all-zero weights shares its budget equally."""
    w = weights.double()
    n = w.numel()
    probs = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return probs
    free = torch.ones(n, dtype=torch.bool)
    budget = rate * n
    while budget > 0 and free.any():
        share = w[free]
        probs[free] = budget * share / share.sum() if share.sum() > 0 else budget / int(free.sum())
        over = free & (probs > 1)
        if not over.any():
            break
        probs[over] = 1.0
        budget = rate * n - float(probs[~free | over].sum())
        free &= ~over
    return probs.clamp(0.0, 1.0)


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def closeness(answer: str | None, gold: str) -> float:
    """How near ``answer`` is to ``gold`` in [0, 1]: numbers by relative distance
    1 - |a - g| / max(1, |g|) floored at 0 (12 for 13: 1 - 1/13), other strings by difflib's
    similarity ratio; 0.0 without an answer."""
    if answer is None:
        return 0.0
    a, g = _number(answer), _number(gold)
    if a is not None and g is not None:
        return max(0.0, 1.0 - abs(a - g) / max(1.0, abs(g)))
    return difflib.SequenceMatcher(None, answer, gold).ratio()


def answer_features(ctx: NoiseContext) -> dict[str, torch.Tensor]:
    """Per sample, float64 [N] each: ``unusual``, ``closeness`` and, when the context has the
    lengths, ``length`` (see the module doc)."""
    out: dict[str, list[float]] = {"unusual": [], "closeness": []}
    canonical: dict[str, str] = {}
    for response, gold in zip(ctx.responses, ctx.golds):
        if gold not in canonical:
            canonical[gold] = ctx.extract(gold) or gold.strip()
        answer = ctx.extract(response)
        unusual = 1.0 if answer is None or answer != canonical[gold] else 0.5 * (response.strip() != answer)
        out["unusual"].append(unusual)
        out["closeness"].append(closeness(answer, canonical[gold]))
    features = {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
    if ctx.response_lengths is not None and ctx.max_length:
        lengths = torch.tensor(ctx.response_lengths, dtype=torch.float64)
        features["length"] = (lengths / float(ctx.max_length)).clamp(0.0, 1.0)
    return features


class FeatureVerifier(Injector):
    """Base of the three verifiers: binary rewards, a seeded draw against feature-based error
    probabilities, one flip per error."""

    takes_param = True
    param_symbol = "P"
    param_range = (0.0, 1.0)
    needs = ("responses", "golds", "extract")
    # Its rates are per class of the reward it receives, and it picks its errors by the answer: after
    # another channel (a right answer unrewarded looks like the nearest of misses) they are not the
    # composition's, so the positive control takes it first only.
    rates_need_clean_input = True

    def error_probs(self, right: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """right [N] bool, features -> error probabilities [N]."""
        raise NotImplementedError

    def _apply(self, rewards, ctx):
        _check_binary(rewards, self.name)
        _needs(ctx, self.name, *self.needs)
        right = (rewards == 1).cpu()
        wrong = self.uniforms(ctx) < self.error_probs(right, answer_features(ctx))
        noisy = torch.where(wrong.to(rewards.device), 1 - rewards, rewards)
        return noisy, self.stats(wrong, right)

    def stats(self, wrong: torch.Tensor, right: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError


def _within(mask: torch.Tensor, weights: torch.Tensor, rate: float) -> torch.Tensor:
    """Error probabilities [N]: ``allocate_errors`` over the samples of ``mask``, 0 elsewhere."""
    probs = torch.zeros(mask.numel(), dtype=torch.float64)
    probs[mask] = allocate_errors(weights[mask], rate)
    return probs


@injector("weak_rm")
class WeakRewardModel(FeatureVerifier):
    """A weak reward model agreeing with the grader with accuracy P (expected over each batch):
    it doubts right answers that are long or in an unusual form and accepts wrong ones that are
    long or near the gold answer. Stats: ``weak_rm_acc`` (realised agreement), ``weak_rm_fp_rate``
    and ``weak_rm_fn_rate`` (the fractions of wrong answers rewarded and of right ones not)."""

    needs = ("responses", "golds", "extract", "response_lengths", "max_length")

    @classmethod
    def describe(cls) -> str:
        return ("weak reward model of accuracy P in [0, 1] (the papers': 0.72), errors on long answers, "
                "right answers in unusual forms and wrong answers near the gold")

    def error_probs(self, right, features):
        length = features["length"]
        weights = torch.where(right, FLOOR + features["unusual"] + length, FLOOR + features["closeness"] + length)
        return allocate_errors(weights, 1.0 - float(self.param))

    def stats(self, wrong, right):
        return {"weak_rm_acc": 1.0 - float(wrong.double().mean()) if len(wrong) else 1.0,
                "weak_rm_fp_rate": _rate(wrong, ~right), "weak_rm_fn_rate": _rate(wrong, right)}


@injector("form_fn")
class FormFalseNegative(FeatureVerifier):
    """A rule verifier's false negatives: right answers lose their reward at rate P over each
    batch's right answers, those in an unusual form first. Wrong answers are untouched.
    Stat ``form_fn_rate`` = the fraction of this batch's right answers unrewarded."""

    @classmethod
    def describe(cls) -> str:
        return ("rule-verifier false negatives: unreward right answers at rate P in [0, 1] (e.g. 0.14), "
                "answers in an unusual form first")

    def channel_rates(self):
        return 0.0, float(self.param)

    def error_probs(self, right, features):
        return _within(right, FLOOR + features["unusual"], float(self.param))

    def stats(self, wrong, right):
        return {"form_fn_rate": _rate(wrong, right)}


@injector("near_fp")
class NearMissFalsePositive(FeatureVerifier):
    """False positives on near misses: wrong answers are rewarded at rate P over each batch's
    wrong answers, those nearest the gold answer first. Right answers are untouched.
    Stat ``near_fp_rate`` = the fraction of this batch's wrong answers rewarded."""

    @classmethod
    def describe(cls) -> str:
        return "false positives on near misses: reward wrong answers at rate P in [0, 1], those nearest the gold first"

    def channel_rates(self):
        return float(self.param), 0.0

    def error_probs(self, right, features):
        return _within(~right, FLOOR + features["closeness"], float(self.param))

    def stats(self, wrong, right):
        return {"near_fp_rate": _rate(wrong, ~right)}
