import math

import pytest
import torch
from scipy.stats import binom

from harness.errors import HarnessError
from harness.seeding import uniform
from noise import NOISE, Injector, NoiseContext, injector, list_noise, parse_noise, parse_noise_list


def make_ctx(n, seed=0, step=0, group=4):
    return NoiseContext(
        seed=seed,
        step=step,
        prompt_ids=[f"p{i // group}" for i in range(n)],
        sample_idx=[i % group for i in range(n)],
    )


def binary_rewards(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < 0.5).float()


# ---------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "text, name",
    [
        ("none", "none"),
        ("flip0.2", "flip0.2"),
        ("flip0.20", "flip0.2"),
        ("flip.2", "flip0.2"),
        ("flip0", "flip0"),
        ("flip0.0", "flip0"),
        ("flip1.0", "flip1"),
        ("flip1", "flip1"),
        ("flip2e-1", "flip0.2"),
        ("flip0.1234567", "flip0.1234567"),  # never rounded, unlike f"{p:g}"
        (" flip0.3 + flip0.1 ", "flip0.3+flip0.1"),
    ],
)
def test_canonical_names(text, name):
    spec = parse_noise(text)
    assert spec.name == name
    assert str(spec) == name
    assert parse_noise(spec.name).name == name  # canonical names round-trip


def test_composition_structure():
    spec = parse_noise("flip0.3+flip0.1")
    assert [(type(i).__name__, i.param, i.position) for i in spec.injectors] == [
        ("Flip", 0.3, 0),
        ("Flip", 0.1, 1),
    ]
    assert parse_noise("none").is_clean and not parse_noise("flip0").is_clean


def test_parse_noise_list():
    specs = parse_noise_list("none, flip0.2,flip0.4+flip0.1")
    assert [s.name for s in specs] == ["none", "flip0.2", "flip0.4+flip0.1"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("foo0.1", "unknown noise 'foo' in 'foo0.1' (valid: corrected, flip, fn, form_fn, fp, gauss, length, near_fp, none, pseudo, rm, weak_rm)"),
        ("flip1.5", "noise parameter P=1.5 in 'flip1.5' is out of range [0, 1]"),
        ("flip", "noise 'flip' needs a parameter: write flipP with P in [0, 1], e.g. 'flip0'"),
        ("none0.3", "noise 'none' takes no parameter, got 'none0.3' (write 'none')"),
        ("", "empty noise setting (e.g. 'none', 'flip0.2', 'fn0.3+gauss0.1')"),
        ("   ", "empty noise setting (e.g. 'none', 'flip0.2', 'fn0.3+gauss0.1')"),
        ("flip0.2+", "empty term in noise setting 'flip0.2+': '+' must join two injectors"),
        ("+flip0.2", "empty term in noise setting '+flip0.2'"),
        ("flip-0.2", "bad parameter '-0.2' in noise 'flip-0.2': expected a non-negative number, as in flipP"),
        ("flip0.2.3", "bad parameter '0.2.3'"),
        ("flipnan", "unknown noise 'flipnan'"),
        ("0.2", "noise term '0.2' must start with an injector name (valid: corrected, flip, fn, form_fn, fp, gauss, length, near_fp, none, pseudo, rm, weak_rm)"),
        ("none+flip0.2", "noise 'none' cannot be combined with other injectors in 'none+flip0.2'"),
        ("none,flip0.2", "contains ','"),
        ("flip0.2\n", None),  # trailing whitespace is fine
        ("foo\nbar", "unknown noise 'foo'"),
    ],
)
def test_parse_errors(text, message):
    if message is None:
        assert parse_noise(text).name == "flip0.2"
        return
    with pytest.raises(HarnessError) as err:
        parse_noise(text)
    text_of_error = str(err.value)
    assert message in text_of_error
    assert "\n" not in text_of_error


@pytest.mark.parametrize(
    "text, message",
    [
        ("flip0.2,flip0.20", "noise list 'flip0.2,flip0.20' names 'flip0.2' twice ('flip0.2' and 'flip0.20')"),
        ("none,,flip0.2", "empty item in noise list 'none,,flip0.2'"),
        ("none,", "empty item in noise list"),
        ("", "empty noise list"),
        ("none,flip9", "out of range [0, 1]"),
    ],
)
def test_parse_list_errors(text, message):
    with pytest.raises(HarnessError) as err:
        parse_noise_list(text)
    assert message in str(err.value)


def test_registry_and_listing():
    # The listing is built from the registry, one line per injector, whatever modules add.
    listing = dict(list_noise())
    assert list(listing) == [NOISE.get(name).usage() for name in NOISE.names()]
    assert {"flip", "fn", "fp", "gauss", "length", "none", "pseudo", "rm"} <= set(NOISE.names())  # those shipped
    assert listing["flipP"] and listing["none"] and listing["pseudoK"]
    assert all(desc and "\n" not in desc for desc in listing.values())


def test_every_module_of_the_noise_package_is_imported():
    # As algorithms/ and tasks/ do: an injector in a new module registers itself by being there.
    import importlib
    import pkgutil
    import sys

    for package in ("noise", "algorithms", "tasks"):
        path = importlib.import_module(package).__path__
        modules = [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
        assert modules and all(name in sys.modules for name in modules), package


def test_new_injector_needs_no_parser_change():
    """A later injector (integer parameter, unbounded range) plugs in via the registry alone."""

    @injector("pseudotest")
    class Pseudo(Injector):
        takes_param = True
        param_symbol = "K"
        param_range = (1, math.inf)
        param_integer = True

        @classmethod
        def describe(cls):
            return "test only"

        def _apply(self, rewards, ctx):
            return rewards + 1, {"seen": 1.0}

    try:
        assert parse_noise("pseudotest16").name == "pseudotest16"
        with pytest.raises(HarnessError, match=r"K=2.5 in 'pseudotest2.5' must be a whole number"):
            parse_noise("pseudotest2.5")
        with pytest.raises(HarnessError, match=r"out of range \[1, inf\)"):
            parse_noise("pseudotest0")
        noisy, stats = parse_noise("flip1+pseudotest8").apply(torch.tensor([0.0, 1.0]), make_ctx(2))
        assert noisy.tolist() == [2.0, 1.0]  # flip first, then +1
        assert stats == {"noise/flip_rate": 1.0, "noise/seen": 1.0, "noise/changed_frac": 0.5}
    finally:
        NOISE._items.pop("pseudotest")


# ---------------------------------------------------------------- none


def test_none_is_identity_and_copies():
    r = torch.tensor([0.0, 1.0, 0.5, -2.0])
    noisy, stats = parse_noise("none").apply(r, make_ctx(4))
    assert torch.equal(noisy, r)
    assert noisy is not r
    assert stats == {"noise/changed_frac": 0.0}
    noisy[0] = 7.0
    assert r[0] == 0.0


# ---------------------------------------------------------------- flip


@pytest.mark.parametrize("p", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_flip_rate_within_binomial_interval(p):
    n = 20000
    r = binary_rewards(n)
    noisy, stats = parse_noise(f"flip{p}").apply(r, make_ctx(n, seed=7, step=3))
    flipped = int((noisy != r).sum())
    low, high = binom.interval(0.999, n, p)
    assert low <= flipped <= high, (p, flipped, low, high)
    assert stats["noise/flip_rate"] == pytest.approx(flipped / n)
    assert stats["noise/changed_frac"] == pytest.approx(flipped / n)
    # flipped entries are exactly 1 - r, the rest untouched
    assert torch.equal(noisy, torch.where(noisy != r, 1 - r, r))
    assert set(noisy.unique().tolist()) <= {0.0, 1.0}


def test_flip_uses_the_documented_draw():
    n = 50
    ctx = make_ctx(n, seed=11, step=5)
    r = binary_rewards(n)
    noisy, _ = parse_noise("flip0.4").apply(r, ctx)
    expected = [
        uniform(11, "noise", 0, "flip", 5, ctx.prompt_ids[i], ctx.sample_idx[i]) < 0.4 for i in range(n)
    ]
    assert (noisy != r).tolist() == expected


def test_flip_leaves_input_untouched_and_keeps_dtype():
    r = torch.tensor([0.0, 1.0] * 50, dtype=torch.float64)
    before = r.clone()
    noisy, _ = parse_noise("flip0.5").apply(r, make_ctx(100))
    assert torch.equal(r, before)
    assert noisy.dtype == torch.float64


def test_flip_determinism():
    n = 400
    r = binary_rewards(n)
    spec = parse_noise("flip0.3")
    a, _ = spec.apply(r, make_ctx(n, seed=1, step=4))
    b, _ = parse_noise("flip0.3").apply(r, make_ctx(n, seed=1, step=4))
    assert torch.equal(a, b)
    c, _ = spec.apply(r, make_ctx(n, seed=1, step=5))
    d, _ = spec.apply(r, make_ctx(n, seed=2, step=4))
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_flip_independent_of_batch_order():
    n = 200
    r = binary_rewards(n)
    ctx = make_ctx(n, seed=3, step=9)
    full, _ = parse_noise("flip0.5").apply(r, ctx)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    pctx = NoiseContext(
        seed=3,
        step=9,
        prompt_ids=[ctx.prompt_ids[i] for i in perm],
        sample_idx=[ctx.sample_idx[i] for i in perm],
    )
    permuted, _ = parse_noise("flip0.5").apply(r[perm], pctx)
    assert torch.equal(permuted, full[perm])
    # a sub-batch gets the same noise as in the full batch
    sub = NoiseContext(3, 9, ctx.prompt_ids[: n // 2], ctx.sample_idx[: n // 2])
    half, _ = parse_noise("flip0.5").apply(r[: n // 2], sub)
    assert torch.equal(half, full[: n // 2])


def test_flip_levels_share_uniforms():
    """flip0.2 flips a subset of what flip0.4 flips (same labels, common random numbers)."""
    n = 2000
    r = binary_rewards(n)
    ctx = make_ctx(n, seed=5)
    lo = parse_noise("flip0.2").apply(r, ctx)[0] != r
    hi = parse_noise("flip0.4").apply(r, ctx)[0] != r
    assert bool((lo & ~hi).sum() == 0) and int(hi.sum()) > int(lo.sum())


def test_flip_rejects_non_binary_and_bad_context():
    with pytest.raises(ValueError, match="binary 0/1"):
        parse_noise("flip0.2").apply(torch.tensor([0.0, 0.5]), make_ctx(2))
    with pytest.raises(ValueError, match="binary 0/1"):
        parse_noise("flip0.2").apply(torch.tensor([-1.0, 1.0]), make_ctx(2))
    with pytest.raises(ValueError, match="3 prompt_ids"):
        parse_noise("flip0.2").apply(torch.tensor([0.0, 1.0]), make_ctx(3))


def test_composition_applies_in_order():
    n = 1000
    r = binary_rewards(n)
    ctx = make_ctx(n, seed=8, step=2)
    out, stats = parse_noise("flip0.3+flip0.2").apply(r, ctx)
    first = torch.tensor([uniform(8, "noise", 0, "flip", 2, p, k) < 0.3 for p, k in zip(ctx.prompt_ids, ctx.sample_idx)])
    second = torch.tensor([uniform(8, "noise", 1, "flip", 2, p, k) < 0.2 for p, k in zip(ctx.prompt_ids, ctx.sample_idx)])
    assert torch.equal(out != r, first ^ second)  # flipped twice == unchanged
    assert stats["noise/flip_rate"] == pytest.approx(first.double().mean().item())
    assert stats["noise/flip_rate.1"] == pytest.approx(second.double().mean().item())
    assert stats["noise/changed_frac"] == pytest.approx((first ^ second).double().mean().item())
    # flip1 then flip1 is the identity; flip1 alone inverts everything
    assert torch.equal(parse_noise("flip1+flip1").apply(r, ctx)[0], r)
    assert torch.equal(parse_noise("flip1").apply(r, ctx)[0], 1 - r)


def test_empty_batch():
    noisy, stats = parse_noise("flip0.5").apply(torch.zeros(0), make_ctx(0))
    assert noisy.shape == (0,)
    assert stats == {"noise/flip_rate": 0.0, "noise/changed_frac": 0.0}
