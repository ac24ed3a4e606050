"""The chain suite: layout, splits, seeding, grader, the warm-start targets' error rate."""
from __future__ import annotations

import collections

import pytest

from harness.errors import HarnessError
from tasks import SUITES
from tasks.chain import HIDDEN, ChainOptions, ChainSuite, make_problem, running_sums


def test_problem_layout_and_trace():
    p = make_problem(4, [7, 3, 5], slots=6)
    assert p.prompt == "4:735...=" and p.answer == "4149" and p.meta["steps"] == 3
    assert running_sums(9, [9, 9]) == [9, 8, 7]
    # Every prompt has the same width and ends in at least one '.' (6 slots: 4 + 1 OOD + 1).
    suite = ChainSuite(ChainOptions(), seed=0)
    widths = {len(p.prompt) for b in suite.eval_benchmarks() for p in b.problems} | {len(p.prompt) for p in suite.train_problems()}
    assert widths == {9}
    assert all(p.prompt.endswith(".=") for b in suite.eval_benchmarks() for p in b.problems)


def test_splits_are_disjoint_graded_and_ood_is_longer():
    suite = ChainSuite(ChainOptions(hidden_frac=0.0), seed=0)
    train = suite.train_problems()
    bench = {b.name: b for b in suite.eval_benchmarks()}
    assert len(train) == 4000 and len({p.id for p in train}) == 4000
    assert not {p.id for p in train} & {p.id for p in bench["chain_id"].problems}
    assert bench["chain_id"].role == "ID" and bench["chain_ood"].role == "OOD"
    # ID: 50 problems of each length 1..4; training: every length, the 50 other L=1 problems only.
    assert collections.Counter(p.meta["steps"] for p in bench["chain_id"].problems) == {1: 50, 2: 50, 3: 50, 4: 50}
    train_lengths = collections.Counter(p.meta["steps"] for p in train)
    assert set(train_lengths) == {1, 2, 3, 4} and train_lengths[1] == 50
    assert {p.meta["steps"] for p in bench["chain_ood"].problems} == {5} and len(bench["chain_ood"].problems) == 200
    for p in [*train, *bench["chain_id"].problems, *bench["chain_ood"].problems]:
        assert p.answer == "".join(map(str, running_sums(p.meta["start"], list(p.meta["addends"]))))
        assert p.prompt.startswith(f"{p.meta['start']}:{''.join(map(str, p.meta['addends']))}.")


def test_splits_are_fixed_by_the_seed():
    a, b, c = (ChainSuite(ChainOptions(), seed=s) for s in (0, 0, 1))
    assert [p.id for p in a.train_problems()] == [p.id for p in b.train_problems()]
    assert [p.id for p in a.train_problems()] != [p.id for p in c.train_problems()]
    assert [a.sft_target(p) for p in a.train_problems()] == [b.sft_target(p) for p in b.train_problems()]


def test_grader_is_exact_match_on_the_whole_trace():
    suite = ChainSuite(ChainOptions(), seed=0)
    p = make_problem(4, [7, 3, 5], slots=6)
    assert suite.grade(" 4149 ", p) == 1.0
    assert suite.grade("4159", p) == 0.0  # a wrong middle step fails, even though...
    assert suite.grade("4139", p) == 0.0
    assert suite.grade("9", p) == 0.0 and suite.grade("41490", p) == 0.0 and suite.grade("", p) == 0.0
    assert suite.in_format("4159", p) and not suite.in_format("415", p) and not suite.in_format("4 1 4 9", p)
    assert suite.extract_answer(" 4159\n") == "4159" and suite.extract_answer("is 4") is None


def test_warm_start_targets_are_in_format_and_off_by_one_at_the_rate_of_their_addend():
    suite = ChainSuite(ChainOptions(small_error=0.1, large_error=0.5), seed=0)
    steps = {False: 0, True: 0}
    wrong = {False: 0, True: 0}
    for p in suite.train_problems():
        target = suite.sft_target(p)
        assert suite.in_format(target, p) and target[0] == str(p.meta["start"])
        digits = [int(d) for d in target]
        for j, a in enumerate(p.meta["addends"]):
            step = (digits[j + 1] - digits[j] - a) % 10  # later steps continue from the written digit
            assert step in (0, 1, 9)
            steps[a >= 5] += 1
            wrong[a >= 5] += step != 0
    assert 0.08 < wrong[False] / steps[False] < 0.12 and 0.47 < wrong[True] / steps[True] < 0.53
    clean = ChainSuite(ChainOptions(small_error=0.0, large_error=0.0), seed=0)
    assert all(clean.sft_target(p) == p.answer for p in clean.train_problems())


def test_hidden_addends_cap_a_share_of_train_and_id_problems_at_a_guess():
    suite = ChainSuite(ChainOptions(), seed=0)
    assert ChainOptions().hidden_frac == 0.4
    plain = ChainSuite(ChainOptions(hidden_frac=0.0), seed=0)
    bench = {b.name: b for b in suite.eval_benchmarks()}
    for split, base in ((suite.train_problems(), plain.train_problems()),
                        (bench["chain_id"].problems, plain.eval_benchmarks()[0].problems)):
        hidden = [p for p in split if "hidden" in p.meta]
        assert 0.35 < len(hidden) / len(split) < 0.45 and len({p.id for p in split}) == len(split)
        for p, q in zip(split, base):  # the same problems, one addend of the hidden ones shown as '?'
            assert p.answer == q.answer and p.meta["addends"] == q.meta["addends"] and len(p.prompt) == len(q.prompt)
            if "hidden" in p.meta:
                j = p.meta["hidden"]
                assert 0 <= j < p.meta["steps"] and p.prompt.count("?") == 1 and p.prompt[2 + j] == "?"
                assert p.prompt[:2 + j] + q.prompt[2 + j] + p.prompt[3 + j:] == q.prompt
                assert p.meta["ceiling"] == 0.1 and p.id == f"{q.id}:h{j}"
            else:
                assert p == q and "?" not in p.prompt and "ceiling" not in p.meta
    assert not any("?" in p.prompt for p in bench["chain_ood"].problems)  # OOD: every addend shown
    assert not any("?" in p.prompt for b in plain.eval_benchmarks() for p in b.problems)


def test_skipped_steps_repeat_the_previous_digit():
    suite = ChainSuite(ChainOptions(small_error=0.1, large_error=0.4, skip_share=0.5), seed=0)
    counts = collections.Counter()
    for p in suite.train_problems():
        digits = [int(d) for d in suite.sft_target(p)]
        for j, a in enumerate(p.meta["addends"]):
            if a in (0, 1, 9):
                continue  # a skip of these looks like a right step or an off-by-one one
            step = (digits[j + 1] - digits[j] - a) % 10
            kind = "right" if step == 0 else "skip" if digits[j + 1] == digits[j] else "off"
            assert kind != "off" or step in (1, 9)
            counts[a >= 5, kind] += 1
    large = sum(counts[True, k] for k in ("right", "skip", "off"))
    assert 0.17 < counts[True, "skip"] / large < 0.23 and 0.17 < counts[True, "off"] / large < 0.23


def test_registered_with_its_evaluation_defaults():
    cls = SUITES.get("chain")
    assert cls is ChainSuite
    assert cls.run_defaults["eval.k"] == "8" and cls.run_defaults["eval.temperature"] == "1.0"
    assert int(cls.run_defaults["eval.final_evals"]) >= 2
    # The OOD answers (L + 2 tokens with EOS) fit the evaluation's length limit.
    assert int(cls.run_defaults["eval.max_new_tokens"]) >= ChainOptions().max_steps + ChainOptions().ood_steps + 2


def test_its_budget_is_the_default_of_a_chain_cell_and_yields_to_steps(tmp_path):
    from harness.resolver import build_cells
    [cell] = build_cells("chain", ["ppo"], "none", [0], tmp_path, check_data=False)
    assert (cell.cfg.train.steps, cell.cfg.train.eval_every, cell.cfg.eval.final_evals) == (120, 20, 2)
    [cell] = build_cells("chain", ["ppo"], "none", [0], tmp_path, steps=40, check_data=False)
    assert cell.cfg.train.steps == 40
    [cell] = build_cells("arith", ["ppo"], "none", [0], tmp_path, check_data=False)
    assert cell.cfg.train.steps == 200  # other suites keep the core default


@pytest.mark.parametrize("kwargs", [dict(max_steps=0), dict(ood_steps=0), dict(max_steps=15, ood_steps=6),
                                    dict(large_error=1.0), dict(small_error=-0.1), dict(n_eval=0), dict(n_train=0),
                                    dict(warmstart_long=-1), dict(hidden_frac=1.5), dict(skip_share=-0.1),
                                    dict(n_val=-1)])
def test_bad_options(kwargs):
    with pytest.raises(HarnessError):
        ChainOptions(**kwargs).validate()


def test_too_many_problems_asked_is_an_error():
    with pytest.raises(HarnessError, match="too few problems"):
        ChainSuite(ChainOptions(max_steps=1, ood_steps=1, n_train=100, n_eval=50), seed=0)


def test_the_warm_start_sees_a_few_longer_chains_that_rl_never_trains_on():
    suite = ChainSuite(ChainOptions(), seed=0)
    train, ood = suite.train_problems(), suite.eval_benchmarks()[1].problems
    extra = suite.warmstart_problems()[len(train):]
    assert suite.warmstart_problems()[:len(train)] == train
    assert len(extra) == 400 and {p.meta["steps"] for p in extra} == {5}
    assert not {p.id for p in extra} & {p.id for p in ood}
    assert all(p.meta["steps"] <= 4 for p in train)  # RL trains on ID lengths only
    assert len(ChainSuite(ChainOptions(warmstart_long=0), seed=0).warmstart_problems()) == len(train)


def test_a_validation_split_is_held_out_of_training_and_leaves_the_other_splits_as_they_are():
    plain, held = ChainSuite(ChainOptions(), seed=0), ChainSuite(ChainOptions(n_val=120), seed=0)
    assert [b.name for b in plain.eval_benchmarks()] == ["chain_id", "chain_ood"]
    for a, b in zip(plain.eval_benchmarks(), held.eval_benchmarks()):
        assert [p.id for p in a.problems] == [p.id for p in b.problems]
    assert [p.id for p in plain.warmstart_problems()] == [p.id for p in held.warmstart_problems()]
    val = held.eval_benchmarks()[2]
    assert (val.name, val.role, len(val.problems)) == ("chain_val", "VAL", 120)
    base = lambda p: p.id.split(":h")[0]  # a hidden problem's id is its shown id plus the hidden slot
    seen = {base(p) for p in held.warmstart_problems() + held.eval_benchmarks()[0].problems}
    assert not {base(p) for p in val.problems} & seen and len({base(p) for p in val.problems}) == 120
    assert {p.meta["steps"] for p in val.problems} <= {1, 2, 3, 4}
    hidden = sum(HIDDEN in p.prompt for p in val.problems)
    assert 0.25 * 120 <= hidden <= 0.55 * 120  # hidden addends at the train and ID share (0.4)
    assert ChainSuite.validation_option == "n_val"
