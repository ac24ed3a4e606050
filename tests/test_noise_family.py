"""The noise family beyond flip: fp, fn, gauss, length, rm, pseudo; composition; the trainer hook."""
import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import binom, chi2, norm

from harness.errors import HarnessError
from harness.seeding import uniform
from noise import NoiseContext, parse_noise
from noise.injectors import length_error_probs, majority_vote
from tests.conftest import FAST, fast_args

Z999 = norm.ppf(0.9995)  # two-sided 99.9%


def make_ctx(n, seed=0, step=0, group=4, lengths=None, max_length=None, regrade=None):
    return NoiseContext(
        seed=seed, step=step,
        prompt_ids=[f"p{i // group}" for i in range(n)],
        sample_idx=[i % group for i in range(n)],
        response_lengths=lengths, max_length=max_length, regrade=regrade,
    )


def binary_rewards(n, seed=123, p_right=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < p_right).float()


def random_lengths(n, seed=5, high=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, high + 1, (n,), generator=g).tolist()


def draws(name, ctx, position=0):
    return torch.tensor([uniform(ctx.seed, "noise", position, name, ctx.step, p, k)
                         for p, k in zip(ctx.prompt_ids, ctx.sample_idx)], dtype=torch.float64)


# ---------------------------------------------------------------- fp / fn


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 1.0])
def test_fp_rewards_only_wrong_answers_at_rate_p(p):
    n = 20000
    r = binary_rewards(n)
    noisy, stats = parse_noise(f"fp{p}").apply(r, make_ctx(n, seed=3, step=2))
    wrong = r == 0
    assert torch.equal(noisy[~wrong], r[~wrong])  # right answers untouched
    changed = int((noisy != r).sum())
    assert torch.equal(noisy[noisy != r], torch.ones(changed))  # 0 -> 1 only
    low, high = binom.interval(0.999, int(wrong.sum()), p)
    assert low <= changed <= high
    assert stats["noise/fp_rate"] == pytest.approx(changed / int(wrong.sum()))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 1.0])
def test_fn_unrewards_only_right_answers_at_rate_p(p):
    n = 20000
    r = binary_rewards(n)
    noisy, stats = parse_noise(f"fn{p}").apply(r, make_ctx(n, seed=3, step=2))
    right = r == 1
    assert torch.equal(noisy[~right], r[~right])  # wrong answers untouched
    changed = int((noisy != r).sum())
    assert torch.equal(noisy[noisy != r], torch.zeros(changed))  # 1 -> 0 only
    low, high = binom.interval(0.999, int(right.sum()), p)
    assert low <= changed <= high
    assert stats["noise/fn_rate"] == pytest.approx(changed / int(right.sum()))


def test_fp_fn_use_the_documented_draws():
    n = 64
    ctx = make_ctx(n, seed=11, step=5)
    r = binary_rewards(n)
    fp, _ = parse_noise("fp0.4").apply(r, ctx)
    fn, _ = parse_noise("fn0.4").apply(r, ctx)
    assert torch.equal(fp != r, (draws("fp", ctx) < 0.4) & (r == 0))
    assert torch.equal(fn != r, (draws("fn", ctx) < 0.4) & (r == 1))


def test_fp_fn_edge_cases():
    ones, zeros = torch.ones(8), torch.zeros(8)
    assert parse_noise("fp1").apply(ones, make_ctx(8))[1]["noise/fp_rate"] == 0.0  # no wrong answers
    assert torch.equal(parse_noise("fp1").apply(zeros, make_ctx(8))[0], ones)
    assert torch.equal(parse_noise("fn1").apply(ones, make_ctx(8))[0], zeros)
    for name in ("fp0.2", "fn0.2", "rm0.8"):
        with pytest.raises(ValueError, match="binary 0/1"):
            parse_noise(name).apply(torch.tensor([0.0, 0.5]), make_ctx(2, lengths=[1, 2]))


# ---------------------------------------------------------------- gauss


def test_gauss_hand_computed():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0])  # population std 0.5
    ctx = make_ctx(4, seed=2, step=1)
    noisy, stats = parse_noise("gauss2").apply(r, ctx)
    u = draws("gauss", ctx)
    expected = r.double() + 2 * 0.5 * torch.tensor(norm.ppf(u.numpy()))
    assert torch.allclose(noisy.double(), expected, atol=1e-6)
    assert stats["noise/gauss_sigma"] == pytest.approx(1.0)


def test_gauss_rate_within_chi2_interval_and_scales_with_s():
    n = 20000
    r = binary_rewards(n, p_right=0.3) * 2 - 0.5  # continuous-looking values, std = 2 * sqrt(.21)
    ctx = make_ctx(n, seed=9, step=4)
    std = float(r.double().std(unbiased=False))
    added = {}
    for s in (0.25, 0.5, 1.0):
        noisy, stats = parse_noise(f"gauss{s}").apply(r, ctx)
        added[s] = noisy.double() - r.double()
        # n * (realised std / true std)^2 ~ chi2(n - 1)
        ratio2 = n * (stats["noise/gauss_rel_std"] / s) ** 2
        assert chi2.ppf(0.0005, n - 1) <= ratio2 <= chi2.ppf(0.9995, n - 1)
        assert abs(float(added[s].mean())) <= Z999 * s * std / math.sqrt(n)
        assert stats["noise/gauss_sigma"] == pytest.approx(s * std)
    # shared z: the noise is proportional to S
    assert torch.allclose(added[0.5], 2 * added[0.25], atol=1e-5)
    assert torch.allclose(added[1.0], 4 * added[0.25], atol=1e-5)


def test_gauss_zero_std_batch_is_unchanged():
    for r in (torch.ones(6), torch.zeros(6), torch.tensor([0.7])):
        noisy, stats = parse_noise("gauss1").apply(r, make_ctx(len(r)))
        assert torch.equal(noisy, r)
        assert stats["noise/gauss_sigma"] == 0.0 and stats["noise/gauss_rel_std"] == 0.0


# ---------------------------------------------------------------- length


def test_length_adds_exactly_c_len_over_l():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0])
    ctx = make_ctx(4, lengths=[0, 5, 10, 3], max_length=20)  # L is the generation limit, not the batch max
    noisy, stats = parse_noise("length0.3").apply(r, ctx)
    assert torch.allclose(noisy, torch.tensor([0.0, 1.075, 1.15, 0.045]), atol=1e-7)
    assert stats["noise/length_bonus"] == pytest.approx((0 + 0.075 + 0.15 + 0.045) / 4)
    with pytest.raises(ValueError, match="response_lengths, max_length"):
        parse_noise("length0.3").apply(r, make_ctx(4))


# ---------------------------------------------------------------- rm


def test_rm_error_probs_hand_computed():
    # distinct lengths: u = [1/8, 3/8, 5/8, 7/8]
    e = length_error_probs(torch.tensor([1, 2, 3, 4]), 0.8)
    assert torch.allclose(e, torch.tensor([0.05, 0.15, 0.25, 0.35], dtype=torch.float64))
    # ties share the mid-rank: lengths 5, 5 have ranks 2 and 3 -> 2.5; p < 1/2 uses the mirror form
    e = length_error_probs(torch.tensor([5, 5, 1, 9]), 0.3)
    assert torch.allclose(e, torch.tensor([0.7, 0.7, 0.475, 0.925], dtype=torch.float64))
    for p in (0.0, 0.2, 0.5, 0.9, 1.0):
        e = length_error_probs(torch.tensor(random_lengths(101)), p)
        assert float(e.mean()) == pytest.approx(1 - p)
        assert float(e.min()) >= 0 and float(e.max()) <= 1


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8, 0.95])
def test_rm_agreement_within_interval_and_errors_on_long_responses(p):
    n = 20000
    r = binary_rewards(n)
    lengths = random_lengths(n)
    noisy, stats = parse_noise(f"rm{p}").apply(r, make_ctx(n, seed=4, step=7, lengths=lengths))
    error = length_error_probs(torch.tensor(lengths), p)
    disagree = noisy != r
    # the number of errors is a sum of independent Bernoulli(e_i): mean n (1 - p), variance sum e (1 - e)
    sd = math.sqrt(float((error * (1 - error)).sum()))
    assert abs(int(disagree.sum()) - n * (1 - p)) <= Z999 * sd
    assert stats["noise/rm_acc"] == pytest.approx(1 - float(disagree.double().mean()))
    # long responses are judged wrongly more often than short ones (flip would not tell them apart)
    x = torch.tensor(lengths)
    short, long = x <= torch.quantile(x.float(), 0.25), x >= torch.quantile(x.float(), 0.75)
    rate_short, rate_long = float(disagree[short].double().mean()), float(disagree[long].double().mean())
    se = math.sqrt(rate_short * (1 - rate_short) / int(short.sum()) + rate_long * (1 - rate_long) / int(long.sum()))
    assert rate_long - rate_short > Z999 * se, (rate_short, rate_long)
    flip_dis = parse_noise(f"flip{1 - p}").apply(r, make_ctx(n, seed=4, step=7))[0] != r
    gap_flip = float(flip_dis[long].double().mean()) - float(flip_dis[short].double().mean())
    assert abs(gap_flip) <= Z999 * se * 1.5  # uniform errors: no length gap


def test_rm_extremes_and_context():
    r = binary_rewards(50)
    ctx = make_ctx(50, lengths=random_lengths(50))
    assert torch.equal(parse_noise("rm1").apply(r, ctx)[0], r)
    assert torch.equal(parse_noise("rm0").apply(r, ctx)[0], 1 - r)
    with pytest.raises(ValueError, match="response_lengths"):
        parse_noise("rm0.8").apply(r, make_ctx(50))


# ---------------------------------------------------------------- pseudo


@pytest.mark.parametrize("answers, label", [
    (["a", "b", "b"], "b"),
    (["a", "b", "b", "a"], "a"),  # tie: first to appear wins
    (["b", "a", "a", "b"], "b"),
    (["x", None, "y", "y", None, None], "y"),  # None does not vote
    ([None, None, "c"], "c"),
    ([None, None], None),
    ([], None),
])
def test_majority_vote(answers, label):
    assert majority_vote(answers) == label


def exact_regrade(texts):
    return lambda i, gold: float(texts[i].strip() == gold)


def test_pseudo_grades_against_majority_label_and_logs_label_accuracy():
    spec = parse_noise("pseudo4")
    assert spec.needs_labels() == 4
    # p0: majority "7" (right); p1: tie "3" vs "4" -> "3" (wrong, gold 4); p2: no answer at all
    spec.set_labels({
        "p0": [("7", 1.0), ("7", 1.0), ("5", 0.0), (None, 0.0)],
        "p1": [("3", 0.0), ("4", 1.0), ("4", 1.0), ("3", 0.0)],
        "p2": [(None, 0.0)] * 4,
    })
    texts = ["7", "5", "3", "4", "", "9"]
    clean = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    ctx = NoiseContext(seed=0, step=1, prompt_ids=["p0", "p0", "p1", "p1", "p2", "p2"], sample_idx=[0, 1] * 3,
                       regrade=exact_regrade(texts))
    noisy, stats = spec.apply(clean, ctx)
    assert noisy.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert stats["noise/pseudo_label_acc"] == pytest.approx(1 / 3)
    assert stats["noise/changed_frac"] == pytest.approx(3 / 6)
    # a composition after pseudo acts on the pseudo rewards
    comp = parse_noise("pseudo4+fn1")
    comp.set_labels({"p0": [("7", 1.0)], "p1": [("3", 0.0)], "p2": [(None, 0.0)]})
    assert comp.apply(clean, ctx)[0].tolist() == [0.0] * 6


def test_pseudo_errors():
    spec = parse_noise("pseudo2")
    ctx = make_ctx(2, group=2, regrade=exact_regrade(["1", "2"]))
    with pytest.raises(ValueError, match="set_labels"):
        spec.apply(torch.zeros(2), ctx)
    spec.set_labels({"other": [("1", 1.0)]})
    with pytest.raises(ValueError, match="no label for problems"):
        spec.apply(torch.zeros(2), ctx)
    assert parse_noise("flip0.2+gauss0.1").needs_labels() == 0
    with pytest.raises(HarnessError, match="must come first"):
        parse_noise("flip0.1+pseudo8")


# ---------------------------------------------------------------- grammar, composition


@pytest.mark.parametrize("text, message", [
    ("fp1.5", "noise parameter P=1.5 in 'fp1.5' is out of range [0, 1]"),
    ("fn2", "out of range [0, 1]"),
    ("rm1.01", "out of range [0, 1]"),
    ("pseudo0", "noise parameter K=0 in 'pseudo0' is out of range [1, inf)"),
    ("pseudo2.5", "K=2.5 in 'pseudo2.5' must be a whole number"),
    ("gauss", "noise 'gauss' needs a parameter: write gaussS with S in [0, inf)"),
    ("length-1", "bad parameter '-1' in noise 'length-1'"),
    ("lenght0.1", "unknown noise 'lenght' in 'lenght0.1' (valid: corrected, flip, fn, form_fn, fp, gauss, length, near_fp, none, pseudo, rm, weak_rm)"),
    ("fn0.3+gaus0.1", "unknown noise 'gaus'"),
    ("gauss0.1+pseudo4", "must come first in a composition"),
])
def test_family_parse_errors_are_one_line(text, message):
    with pytest.raises(HarnessError) as err:
        parse_noise(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_composition_fn_then_gauss():
    n = 4000
    r = binary_rewards(n)
    ctx = make_ctx(n, seed=6, step=3)
    out, stats = parse_noise("fn0.3+gauss0.1").apply(r, ctx)
    after_fn = torch.where((draws("fn", ctx) < 0.3) & (r == 1), 0.0, r.double())
    z = torch.tensor(norm.ppf(draws("gauss", ctx, position=1).numpy()))
    expected = after_fn + 0.1 * float(after_fn.std(unbiased=False)) * z
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert set(stats) == {"noise/fn_rate", "noise/gauss_sigma", "noise/gauss_rel_std", "noise/changed_frac"}
    assert 0.25 < stats["noise/fn_rate"] < 0.35


def test_composition_rm_then_length():
    n = 200
    r = binary_rewards(n)
    lengths = random_lengths(n)
    ctx = make_ctx(n, seed=1, step=2, lengths=lengths, max_length=64)
    out, stats = parse_noise("rm0.8+length0.1").apply(r, ctx)
    rm_only, _ = parse_noise("rm0.8").apply(r, ctx)
    assert torch.allclose(out, rm_only + 0.1 * torch.tensor(lengths) / 64)
    assert {"noise/rm_acc", "noise/length_bonus"} <= set(stats)


@pytest.mark.parametrize("setting", ["fp0.4", "fn0.4", "gauss0.5", "rm0.7", "length0.2", "fn0.3+gauss0.1"])
def test_permutation_equivariant_and_deterministic(setting):
    n = 120
    r = binary_rewards(n)
    lengths = random_lengths(n)
    ctx = make_ctx(n, seed=3, step=9, lengths=lengths, max_length=64)
    full, _ = parse_noise(setting).apply(r, ctx)
    again, _ = parse_noise(setting).apply(r, ctx)
    assert torch.equal(full, again)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    pctx = NoiseContext(3, 9, [ctx.prompt_ids[i] for i in perm], [ctx.sample_idx[i] for i in perm],
                        [lengths[i] for i in perm], 64)
    permuted, _ = parse_noise(setting).apply(r[perm], pctx)
    assert torch.allclose(permuted, full[perm], atol=1e-6)
    other, _ = parse_noise(setting).apply(r, NoiseContext(3, 10, ctx.prompt_ids, ctx.sample_idx, lengths, 64))
    assert setting.startswith("length") or not torch.equal(other, full)  # a new step draws new noise


# ---------------------------------------------------------------- trainer hook and CLI


def test_trainer_labels_only_drawn_problems(tmp_path, cache_dir):
    from harness.resolver import build_cells
    from harness.trainer import Trainer

    cell = build_cells("arith", ["grpo"], "pseudo3", [0], tmp_path, steps=2, overrides=dict(FAST))[0]
    trainer = Trainer(cell.cfg, cell.path, cache_dir, progress=False)
    votes = trainer.label_votes(3)
    drawn = {p.id for s in (1, 2) for p in trainer.step_problems(s)}
    assert set(votes) == drawn and len(drawn) == 8  # 2 steps x 4 prompts, not the 200 train problems
    assert all(len(pairs) == 3 for pairs in votes.values())
    assert votes == trainer.label_votes(3)  # seeded
    problems = {p.id: p for p in trainer.train_set}
    for pid, pairs in votes.items():
        for answer, grade in pairs:
            assert grade == float(answer == problems[pid].answer)  # arith: exact match of the stripped text


def test_cli_runs_pseudo_and_rm_length(tmp_path, cache_dir, capsys):
    from harness.cli import main

    out = tmp_path / "runs"
    args = ["run", "--algos", "grpo", "--noise", "pseudo4,rm0.8+length0.1", "--seeds", "1", "--steps", "2",
            "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", *fast_args()]
    assert main(args) == 0
    expected = {"pseudo4": ["noise/pseudo_label_acc"], "rm0.8+length0.1": ["noise/rm_acc", "noise/length_bonus"]}
    for noise, keys in expected.items():
        cell = Path(out, "arith", "grpo", noise, "seed0")
        assert json.loads((cell / "status.json").read_text())["state"] == "done"
        lines = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == 2
        for line in lines:
            for key in keys:
                assert 0.0 <= line[key] <= 1.0
            assert "noise/changed_frac" in line
    assert main(["list", "noise"]) == 0
    listing = capsys.readouterr().out
    for usage in ("none", "flipP", "fpP", "fnP", "gaussS", "lengthC", "pseudoK", "rmP", "weak_rmP", "form_fnP", "near_fpP",
                  "corrected"):
        assert any(line.startswith(usage + " ") and len(line.split(None, 1)[1]) > 20 for line in listing.splitlines())
