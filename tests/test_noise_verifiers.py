"""The papers' noise beyond flips: verifiers whose errors follow answer features (weak_rm, form_fn,
near_fp) and the positive control (corrected). Rates by simulation within binomial bounds; the
correction's expectation equals the clean reward."""
import difflib

import pytest
import torch
from scipy.stats import binom, norm

from harness.errors import HarnessError
from noise import NoiseContext, parse_noise
from noise.correction import composed_rates, corrected_reward
from noise.verifiers import FLOOR, allocate_errors, answer_features, closeness
from tasks.arith import ArithSuite, ArithOptions

Z999 = norm.ppf(0.9995)
EXTRACT = ArithSuite(ArithOptions(n_train=10, n_eval=4), 0).extract_answer  # "is 12" -> "12"


def ctx_for(responses, golds, seed=0, step=3, lengths=None, max_length=None):
    n = len(responses)
    return NoiseContext(seed=seed, step=step, prompt_ids=[f"p{i // 4}" for i in range(n)],
                        sample_idx=[i % 4 for i in range(n)], response_lengths=lengths, max_length=max_length,
                        responses=list(responses), golds=list(golds), extract=EXTRACT)


def within_binomial(count, n, p):
    low, high = binom.interval(0.999, n, p)
    return low <= count <= high


# ---------------------------------------------------------------- the pieces


def test_allocate_errors_by_hand():
    # no cap: 0.3 * 4 = 1.2 errors shared 1:1:1:10
    assert allocate_errors(torch.tensor([1.0, 1, 1, 10]), 0.3).tolist() == pytest.approx([1.2 / 13] * 3 + [12 / 13])
    # cap: 0.5 * 4 = 2 errors; 10 / 13 * 2 > 1 -> 1, the remaining 1 split equally over the other three
    assert allocate_errors(torch.tensor([1.0, 1, 1, 10]), 0.5).tolist() == pytest.approx([1 / 3] * 3 + [1.0])
    assert allocate_errors(torch.zeros(4), 0.25).tolist() == pytest.approx([0.25] * 4)  # no weight: equal shares
    assert allocate_errors(torch.tensor([0.0, 2.0]), 0.25).tolist() == pytest.approx([0.0, 0.5])
    assert allocate_errors(torch.tensor([3.0, 1.0]), 1.0).tolist() == [1.0, 1.0]
    assert allocate_errors(torch.tensor([3.0, 1.0]), 0.0).tolist() == [0.0, 0.0]
    assert allocate_errors(torch.zeros(0), 0.5).numel() == 0
    w = torch.rand(101, generator=torch.Generator().manual_seed(1)) ** 4
    for rate in (0.14, 0.28, 0.72, 0.95):
        probs = allocate_errors(w, rate)
        assert float(probs.mean()) == pytest.approx(rate) and float(probs.max()) <= 1.0
        below = probs < 1  # proportional to the weights where not capped
        ratio = probs[below] / w[below]
        assert float(ratio.max()) == pytest.approx(float(ratio.min()))


def test_closeness_by_hand():
    assert closeness("12", "13") == pytest.approx(1 - 1 / 13)
    assert closeness("-2", "0") == pytest.approx(0.0)  # |g| < 1 scales by 1: 1 - 2 floored at 0
    assert closeness("0.5", "0") == pytest.approx(0.5)
    assert closeness("200", "13") == 0.0
    assert closeness("1,000", "999") == pytest.approx(1 - 1 / 999)
    assert closeness("abc", "abd") == pytest.approx(difflib.SequenceMatcher(None, "abc", "abd").ratio())
    assert closeness("abc", "abd") == pytest.approx(2 / 3)
    assert closeness(None, "13") == 0.0


def test_answer_features_read_the_suites_extraction():
    f = answer_features(ctx_for(["12", "is 12", "", "11", "is 40"], ["12"] * 5, lengths=[2, 4, 1, 2, 8],
                                max_length=8))
    assert f["unusual"].tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]  # "is 12": the gold's number, wrapped
    assert f["closeness"].tolist() == pytest.approx([1.0, 1.0, 0.0, 1 - 1 / 12, 0.0])
    assert f["length"].tolist() == [0.25, 0.5, 0.125, 0.25, 1.0]
    assert "length" not in answer_features(ctx_for(["1"], ["1"]))


# ---------------------------------------------------------------- form_fn


def test_form_fn_misses_right_answers_in_unusual_forms_first_at_rate_p():
    """Right answers: 30 % wrapped ("is 7", unusual 0.5); weights 0.6 vs 0.1, so P(miss | wrapped) =
    0.14 * 0.6 / (0.3 * 0.6 + 0.7 * 0.1) = 0.336 and P(miss | bare) = 0.056; wrong answers untouched."""
    n = 20000
    g = torch.Generator().manual_seed(7)
    right = torch.rand(n, generator=g) < 0.5
    unusual = torch.zeros(n, dtype=torch.bool)
    idx = right.nonzero().squeeze(-1)
    unusual[idx[: int(0.3 * len(idx))]] = True
    responses = ["is 7" if u else ("7" if r else "8") for r, u in zip(right.tolist(), unusual.tolist())]
    rewards = right.float()
    noisy, stats = parse_noise("form_fn0.14").apply(rewards, ctx_for(responses, ["7"] * n))
    assert torch.equal(noisy[~right], rewards[~right])
    missed = right & (noisy == 0)
    n_un, n_us = int(unusual.sum()), int((right & ~unusual).sum())
    denom = (n_un * (0.5 + FLOOR) + n_us * FLOOR) / (n_un + n_us)
    p_un, p_us = 0.14 * (0.5 + FLOOR) / denom, 0.14 * FLOOR / denom
    assert p_un == pytest.approx(0.336, abs=0.002) and p_us == pytest.approx(0.056, abs=0.001)
    assert within_binomial(int((missed & unusual).sum()), n_un, p_un)
    assert within_binomial(int((missed & ~unusual & right).sum()), n_us, p_us)
    assert stats["noise/form_fn_rate"] == pytest.approx(int(missed.sum()) / int(right.sum()))
    assert abs(stats["noise/form_fn_rate"] - 0.14) < Z999 * (0.14 * 0.86 / int(right.sum())) ** 0.5 * 1.5


def test_form_fn_on_an_all_usual_batch_is_fn_at_rate_p():
    n = 20000
    right = binom.rvs(1, 0.5, size=n, random_state=3).astype(bool)
    rewards = torch.tensor(right, dtype=torch.float32)
    noisy, _ = parse_noise("form_fn0.14").apply(rewards, ctx_for(["7" if r else "9" for r in right], ["7"] * n))
    missed = int(((rewards == 1) & (noisy == 0)).sum())
    assert within_binomial(missed, int(right.sum()), 0.14)


# ---------------------------------------------------------------- near_fp


def test_near_fp_rewards_the_near_misses_first_at_rate_p():
    """Wrong answers to gold 100: half are 99 (closeness 0.99), half 500 (closeness 0); weights 1.09
    vs 0.1, so P(rewarded | 99) = 0.1 * 1.09 / 0.595 and P(rewarded | 500) = 0.1 * 0.1 / 0.595."""
    n = 20000
    responses = ["99" if i % 4 < 2 else "500" for i in range(n)]
    rewards = torch.zeros(n)
    rewards[::8] = 1.0  # some right answers, never touched
    responses = ["100" if r == 1 else s for r, s in zip(rewards.tolist(), responses)]
    noisy, stats = parse_noise("near_fp0.1").apply(rewards, ctx_for(responses, ["100"] * n))
    right = rewards == 1
    assert torch.equal(noisy[right], rewards[right])
    near = torch.tensor([s == "99" for s in responses])
    far = torch.tensor([s == "500" for s in responses])
    w_near, w_far = FLOOR + 0.99, FLOOR
    mean_w = (int(near.sum()) * w_near + int(far.sum()) * w_far) / int((~right).sum())
    hit = noisy == 1
    assert within_binomial(int((hit & near).sum()), int(near.sum()), 0.1 * w_near / mean_w)
    assert within_binomial(int((hit & far).sum()), int(far.sum()), 0.1 * w_far / mean_w)
    assert stats["noise/near_fp_rate"] == pytest.approx(int((hit & ~right).sum()) / int((~right).sum()))


# ---------------------------------------------------------------- weak_rm


def test_weak_rm_agrees_at_its_accuracy_and_errs_on_features():
    n = 20000
    g = torch.Generator().manual_seed(11)
    right = torch.rand(n, generator=g) < 0.4
    lengths = torch.randint(1, 33, (n,), generator=g)
    responses = ["12" if r else ("13" if i % 2 else "90") for i, r in enumerate(right.tolist())]
    rewards = right.float()
    noisy, stats = parse_noise("weak_rm0.72").apply(
        rewards, ctx_for(responses, ["12"] * n, lengths=lengths.tolist(), max_length=32))
    errors = noisy != rewards
    assert within_binomial(int(errors.sum()), n, 0.28)  # the stated accuracy, 72 %
    assert stats["noise/weak_rm_acc"] == pytest.approx(1 - float(errors.double().mean()))
    assert stats["noise/weak_rm_fp_rate"] == pytest.approx(float(errors[~right].double().mean()))
    assert stats["noise/weak_rm_fn_rate"] == pytest.approx(float(errors[right].double().mean()))
    # the errors follow the features: near misses (13) over far ones (90), long over short
    near = torch.tensor([s == "13" for s in responses])
    far = torch.tensor([s == "90" for s in responses])
    assert errors[near].double().mean() > errors[far].double().mean() + 0.1
    assert errors[lengths > 24].double().mean() > errors[lengths <= 8].double().mean() + 0.1
    with pytest.raises(ValueError, match="weak_rm noise needs NoiseContext.response_lengths, max_length"):
        parse_noise("weak_rm0.72").apply(rewards[:4], ctx_for(responses[:4], ["12"] * 4))


@pytest.mark.parametrize("name", ["weak_rm0.72", "form_fn0.14", "near_fp0.1"])
def test_verifiers_are_seeded_per_step_prompt_and_sample(name):
    n = 400
    rewards = (torch.arange(n) % 3 == 0).float()
    responses = ["12" if r else ("13" if i % 2 else "is 12") for i, r in enumerate(rewards.tolist())]
    lengths = [(i * 7) % 30 + 1 for i in range(n)]
    ctx = ctx_for(responses, ["12"] * n, lengths=lengths, max_length=32)
    a, _ = parse_noise(name).apply(rewards, ctx)
    assert torch.equal(a, parse_noise(name).apply(rewards, ctx)[0])  # same seed, same noise
    flip = torch.arange(n - 1, -1, -1)  # the same samples in the reverse order: each keeps its noise
    rev = NoiseContext(seed=0, step=3, prompt_ids=[ctx.prompt_ids[i] for i in flip],
                       sample_idx=[ctx.sample_idx[i] for i in flip], response_lengths=[lengths[i] for i in flip],
                       max_length=32, responses=[responses[i] for i in flip], golds=["12"] * n, extract=EXTRACT)
    assert torch.equal(parse_noise(name).apply(rewards[flip], rev)[0], a[flip])
    other = ctx_for(responses, ["12"] * n, step=4, lengths=lengths, max_length=32)
    assert not torch.equal(parse_noise(name).apply(rewards, other)[0], a)  # another step, other draws


def test_verifiers_need_binary_rewards_and_answer_context():
    with pytest.raises(ValueError, match="binary"):
        parse_noise("form_fn0.1").apply(torch.tensor([0.5]), ctx_for(["1"], ["1"]))
    bare = NoiseContext(seed=0, step=0, prompt_ids=["p"], sample_idx=[0])
    with pytest.raises(ValueError, match="near_fp noise needs NoiseContext.responses, golds, extract"):
        parse_noise("near_fp0.1").apply(torch.tensor([0.0]), bare)


# ---------------------------------------------------------------- the positive control


def test_composed_rates_by_hand():
    assert composed_rates([(0.2, 0.2)]) == pytest.approx((0.2, 0.2))
    # flip0.1 then fn0.2: a wrong answer is rewarded by the flip and kept: 0.1 * 0.8; a right one is
    # unrewarded by the flip (0.1) or kept by it and unrewarded by fn (0.9 * 0.2)
    assert composed_rates([(0.1, 0.1), (0.0, 0.2)]) == pytest.approx((0.08, 0.28))
    assert composed_rates([(0.3, 0.0), (0.0, 0.14)]) == pytest.approx((0.3 * 0.86, 0.14))
    spec = parse_noise("form_fn0.14+fp0.3+corrected")  # a right answer ends unrewarded: missed and kept by fp
    assert (spec.injectors[-1].fp, spec.injectors[-1].fn) == pytest.approx((0.3, 0.14 * 0.7))


@pytest.mark.parametrize("p", [0.1, 0.2, 0.4])
def test_corrected_expectation_is_the_clean_reward_exactly(p):
    # E[r^ | r=1] = (1-p) (1-p)/(1-2p) + p (0-p)/(1-2p) = 1; E[r^ | r=0] = p (1-p)/(1-2p) + (1-p)(-p)/(1-2p) = 0
    hi, lo = corrected_reward(torch.tensor([1.0, 0.0], dtype=torch.float64), p, p).tolist()
    assert hi == pytest.approx((1 - p) / (1 - 2 * p)) and lo == pytest.approx(-p / (1 - 2 * p))
    assert (1 - p) * hi + p * lo == pytest.approx(1.0)
    assert p * hi + (1 - p) * lo == pytest.approx(0.0)


@pytest.mark.parametrize("setting", ["flip0.2+corrected", "flip0.1+fn0.2+corrected", "fp0.3+corrected",
                                     "form_fn0.14+flip0.1+corrected", "near_fp0.1+corrected"])
def test_corrected_reward_averages_the_clean_one_by_simulation(setting):
    n = 40000
    right = binom.rvs(1, 0.4, size=n, random_state=5).astype(bool)
    rewards = torch.tensor(right, dtype=torch.float32)
    responses = ["5" if r else ("6" if i % 2 else "50") for i, r in enumerate(right)]
    spec = parse_noise(setting)
    fp, fn = spec.injectors[-1].fp, spec.injectors[-1].fn
    out, stats = spec.apply(rewards, ctx_for(responses, ["5"] * n))
    assert stats["noise/corrected_fp"] == fp and stats["noise/corrected_fn"] == fn
    for cls, clean in ((right, 1.0), (~right, 0.0)):
        values = out[torch.tensor(cls)].double()
        sd = 1 / (1 - fp - fn)  # the corrected reward takes two values 1/(1-fp-fn) apart: sd <= half that
        assert abs(float(values.mean()) - clean) < Z999 * sd / 2 / len(values) ** 0.5


@pytest.mark.parametrize("setting, message", [
    ("corrected", "write it after that noise, e.g. 'flip0.2+corrected'"),
    ("corrected+flip0.1", "noise 'corrected' must come last in a composition"),
    ("flip0.2+corrected+fn0.1", "noise 'corrected' must come last in a composition"),
    ("gauss0.1+corrected", "needs known rates, which gauss has not (valid before it: flip, fp, fn, form_fn, near_fp)"),
    ("weak_rm0.72+corrected", "which weak_rm has not"),
    ("flip0.5+corrected", "cannot correct rates fp 0.5 + fn 0.5 >= 1"),
    ("form_fn0.14+near_fp0.1+corrected", "near_fp picks its errors by the answer, so its rates hold on the clean "
                                         "reward only: put it first"),
    ("corrected0.1", "noise 'corrected' takes no parameter"),
])
def test_corrected_is_refused_where_it_cannot_correct(setting, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        parse_noise(setting)


def test_corrected_names_a_folder():
    assert parse_noise("flip0.20+corrected").name == "flip0.2+corrected"


@pytest.mark.slow
def test_cli_trains_under_the_verifiers_and_the_control(tmp_path, cache_dir):
    """The trainer hands the verifiers the responses, the golds and the suite's extraction."""
    import json
    from pathlib import Path

    from harness.cli import main
    from tests.conftest import fast_args

    out = tmp_path / "runs"
    args = ["run", "--algos", "ppo", "--noise", "weak_rm0.72,form_fn0.14+flip0.1+corrected,near_fp0.1", "--seeds", "1",
            "--steps", "2", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", *fast_args()]
    assert main(args) == 0
    expected = {"weak_rm0.72": ["noise/weak_rm_acc", "noise/weak_rm_fp_rate", "noise/weak_rm_fn_rate"],
                "near_fp0.1": ["noise/near_fp_rate"], "form_fn0.14+flip0.1+corrected": ["noise/form_fn_rate"]}
    for noise, keys in expected.items():
        cell = Path(out, "arith", "ppo", noise, "seed0")
        lines = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(0.0 <= line[k] <= 1.0 for line in lines for k in keys)
    for line in lines:  # fp = 0.1 (the flip), fn = 0.14 (1 - 0.1) + 0.86 * 0.1 = 0.212
        assert line["noise/corrected_fp"] == pytest.approx(0.1) and line["noise/corrected_fn"] == pytest.approx(0.212)


def test_the_correction_is_affine_so_group_normalised_advantages_ignore_it():
    """(r - fp) / (1 - fp - fn) is one affine map for the whole batch: GRPO's group-normalised
    advantages under flip0.2+corrected are those under flip0.2 (the variance the flips add stays)."""
    from algorithms.common import group_advantages

    n = 64
    right = binom.rvs(1, 0.5, size=n, random_state=9)
    rewards = torch.tensor(right, dtype=torch.float32)
    responses = [str(int(r)) for r in right]
    ctx = ctx_for(responses, ["1"] * n)
    noisy, _ = parse_noise("flip0.2").apply(rewards, ctx)
    corrected, _ = parse_noise("flip0.2+corrected").apply(rewards, ctx)
    assert torch.allclose(corrected, (noisy - 0.2) / 0.6)  # the same flips, then the affine map
    groups = torch.arange(n) // 4
    assert torch.allclose(group_advantages(corrected, groups), group_advantages(noisy, groups), atol=1e-5)
