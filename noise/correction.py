"""The positive control: the backward-corrected reward for known noise rates (Cai et al. 2025).

``corrected`` comes last in a composition of binary channels with known rates (``flipP``, ``fpP``,
``fnP``, ``form_fnP``, ``near_fpP``: their ``channel_rates``) and replaces the noisy binary reward
r~ by

    r^ = (r~ - fp) / (1 - fp - fn)

where fp and fn are the composition's rates: the probability that a wrong answer ends rewarded
and that a right one ends unrewarded. Since E[r~ | r = 1] = 1 - fn and E[r~ | r = 0] = fp, the
corrected reward's expectation is the clean reward r for either class: unbiased, at the price of
variance (under ``flip0.2`` it is 4/3 or -1/3). An algorithm that learns from the clean reward's
expectation should recover most of the clean gain with it, so a run under ``flip0.2+corrected``
checks that the testbed and the algorithm can tell the signal from the noise at all.

**What it can and cannot undo.** With rates known for the whole batch the correction is one affine
map of the noisy reward, the same for every sample: it removes the bias the noise puts in the
reward's mean, not the variance it adds. An update invariant to the reward's scale and offset
ignores it: GRPO's group-normalised advantages are exactly those of the uncorrected reward (a test
shows it), and PPO with whitened advantages sees it only through the KL penalty's relative weight
and the value clip's absolute range (on arith, PPO under flip0.2+corrected gained 3.2 points more
than under flip0.2, 5 seeds: the scale, 1 / (1 - fp - fn), against the KL penalty). The report's
positive-control gate therefore reads, for such algorithms, whether the testbed's signal survives
the noise once its bias and scale are undone.

Chained channels compose: a wrong answer ends rewarded if the first channel rewards it and the
second keeps it, or the first keeps it at 0 and the second rewards it,

    fp = fp1 (1 - fn2) + (1 - fp1) fp2,    fn = fn1 (1 - fp2) + (1 - fn1) fn2.

Rates with fp + fn >= 1 carry no signal (or an inverted one) and are refused when parsed. The
composition rule assumes each channel errs independently of what the channels before it did; the
feature verifiers (``form_fn``, ``near_fp``) do not, so they are taken first only.
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError
from noise.injectors import Injector, _check_binary, injector


def composed_rates(rates: list[tuple[float, float]]) -> tuple[float, float]:
    """The (fp, fn) of binary channels applied left to right."""
    fp, fn = 0.0, 0.0
    for fp2, fn2 in rates:
        fp, fn = fp * (1 - fn2) + (1 - fp) * fp2, fn * (1 - fp2) + (1 - fn) * fn2
    return fp, fn


def corrected_reward(noisy: torch.Tensor, fp: float, fn: float) -> torch.Tensor:
    """(r~ - fp) / (1 - fp - fn), elementwise; noisy [N] -> [N] in the same dtype."""
    return ((noisy.double() - fp) / (1.0 - fp - fn)).to(noisy.dtype)


@injector("corrected")
class Corrected(Injector):
    """Backward correction of the binary noise before it in the composition, for its known rates."""

    must_be_last = True

    def __init__(self, param: float | None = None, position: int = 0):
        super().__init__(param, position)
        self.fp = self.fn = None

    @classmethod
    def describe(cls) -> str:
        return ("positive control, last in a composition (flip0.2+corrected): (r - fp) / (1 - fp - fn) for the "
                "known rates of the binary noise before it, an unbiased estimate of the clean reward")

    def follow(self, before):
        if not before:
            raise HarnessError("noise 'corrected' corrects the noise before it: write it after that noise, "
                               "e.g. 'flip0.2+corrected'")
        unknown = [inj.name for inj in before if inj.channel_rates() is None]
        if unknown:
            raise HarnessError(f"noise 'corrected' needs known rates, which {', '.join(unknown)} has not "
                               f"(valid before it: flip, fp, fn, form_fn, near_fp)")
        late = [inj.name for inj in before[1:] if getattr(inj, "rates_need_clean_input", False)]
        if late:
            raise HarnessError(f"noise 'corrected': {', '.join(late)} picks its errors by the answer, so its rates "
                               f"hold on the clean reward only: put it first in the composition")
        self.fp, self.fn = composed_rates([inj.channel_rates() for inj in before])
        if self.fp + self.fn >= 1:
            raise HarnessError(f"noise 'corrected' cannot correct rates fp {self.fp:g} + fn {self.fn:g} >= 1: "
                               f"such a reward carries no signal (use rates whose sum is below 1)")

    def _apply(self, rewards, ctx):
        if self.fp is None:
            raise ValueError("noise 'corrected' was not set up by the parser (use noise.parse_noise)")
        _check_binary(rewards, self.name)
        return corrected_reward(rewards, self.fp, self.fn), {"corrected_fp": self.fp, "corrected_fn": self.fn}
