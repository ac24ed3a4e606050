"""`harness tune`: search spaces and their draws, the validation split, the selection rule on a
hand-built tuning store, the refusals (test benchmarks, shared seeds, no validation split), the
tuned grid file that `harness run --config` takes, and resume after `kill -9` to the same file."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from algorithms import ALGOS
from algorithms.search import Choice, LogUniform, Uniform, search_space
from harness import checkpoints, store
from harness.cli import main
from harness.cli_parser import build_parser, subparser
from harness.errors import HarnessError
from harness.resolver import build_cells
from harness.runfile import file_defaults
from harness.seeding import uniform
from harness.tune import TUNE_SEED_BASE, draw_trial, grid_file_text, parse_tune_seeds, tuned_overrides
from harness.tune_plan import Plan, cell_scores, select, trial_dir
from tasks import SUITES
from tests.conftest import fast_args, kill_9_when_stalled

ROOT = Path(__file__).resolve().parents[1]


# ---- distributions and draws ------------------------------------------------------------------

def test_distributions_map_a_uniform_draw_by_hand():
    lu = LogUniform(1e-4, 1e-2)
    assert lu.sample(0.0) == 1e-4
    assert lu.sample(0.5) == 1e-3  # the geometric mean: halfway in log space
    assert lu.sample(0.25) == pytest.approx(3.16e-4)  # 10 ** -3.5, three significant digits
    assert Uniform(0.0, 2.0).sample(0.25) == 0.5
    c = Choice((2, 4, 8))
    assert [c.sample(u) for u in (0.0, 0.33, 0.34, 0.67, 0.999)] == [2, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        LogUniform(0.0, 1.0)


def test_a_draw_is_keyed_by_algorithm_trial_and_key():
    """The value of a key is LogUniform.sample of uniform(seed, "tune", algo, trial, key): what
    other algorithms, trials or keys there are never shifts it."""
    u = uniform(7, "tune", "ppo", 3, "train.lr")
    expected = LogUniform(3e-5, 1e-3).sample(u)
    assert draw_trial("ppo", 3, 7)["train.lr"] == expected
    assert draw_trial("ppo", 3, 7) == draw_trial("ppo", 3, 7)
    assert draw_trial("ppo", 3, 7) != draw_trial("ppo", 4, 7)
    assert draw_trial("ppo", 3, 7)["train.lr"] != draw_trial("dvpo", 3, 7)["train.lr"]
    assert draw_trial("ppo", 0, 7) == {}, "trial 0 is the grid's own configuration"


@pytest.mark.parametrize("algo", ALGOS.names())
def test_every_algorithm_has_a_space_whose_draws_are_valid_configurations(algo, tmp_path):
    """Shared knobs for all (lr; critic lr with a critic; KL coefficient with a KL term), and every
    drawn trial resolves to a valid cell that carries the drawn values."""
    cls = ALGOS.get(algo)
    space = search_space(cls)
    assert space["train.lr"] == LogUniform(3e-5, 1e-3)
    assert ("train.critic_lr" in space) == (cls.critic != "none")
    for trial in (1, 2, 3):
        values = draw_trial(algo, trial, 0)
        assert set(values) == set(space)
        from harness.tune import config_value, trial_overrides

        cell = build_cells("arith", [algo], "none", [0], tmp_path, overrides=trial_overrides(algo, values))[0]
        for key, value in values.items():
            assert config_value(cell.cfg, key) == value, key


def test_own_knobs_are_declared_by_the_modules():
    assert search_space(ALGOS.get("flowrl"))["algo.beta"] == LogUniform(2.0, 40.0)
    assert search_space(ALGOS.get("grpo"))["train.group_size"] == Choice((2, 4, 8))
    assert "algo.kl_coef" not in search_space(ALGOS.get("dapo")), "DAPO has no KL term"
    for algo in ("dvpo", "dfpo"):
        assert search_space(ALGOS.get(algo))["algo.risk_adv_weight"] == Uniform(0.0, 1.0)
        assert "algo.risk_adv_weight" in search_space(ALGOS.get(f"{algo}_tails_off"))
        assert "algo.risk_adv_weight" not in search_space(ALGOS.get(f"{algo}_risk_off")), "the ablation pins it at 0"


# ---- per-algorithm core keys (what a tuned grid file sets) ---------------------------------------

def test_algo_train_keys_apply_to_that_algorithm_only(tmp_path):
    cells = build_cells("arith", ["ppo", "grpo"], "none", [0], tmp_path,
                        overrides={"train.lr": "2e-4", "ppo.train.lr": "1e-4", "grpo.train.group_size": "8",
                                   "ppo.kl_coef": "0.01"})
    by = {c.cfg.algo: c.cfg for c in cells}
    assert by["ppo"].train.lr == 1e-4 and by["grpo"].train.lr == 2e-4
    assert by["grpo"].train.group_size == 8 and by["ppo"].train.group_size == 4
    assert by["ppo"].algo_options.kl_coef == 0.01
    with pytest.raises(HarnessError, match=r"ppo\.train\.lr='x': not a valid float"):
        build_cells("arith", ["ppo"], "none", [0], tmp_path, overrides={"ppo.train.lr": "x"})
    with pytest.raises(HarnessError, match="train.lr must be > 0"):
        build_cells("arith", ["ppo"], "none", [0], tmp_path, overrides={"ppo.train.lr": "-1"})


# ---- the validation split --------------------------------------------------------------------

def arith(**options):
    cls = SUITES.get("arith")
    return cls(cls.Options(**options), 0)


def test_arith_validation_is_held_out_of_train_and_disjoint_from_the_tests():
    plain, held = arith(), arith(n_val=50)
    assert [b.name for b in plain.eval_benchmarks()] == ["arith_id", "arith_ood"], "n_val=0 changes nothing"
    benches = {b.name: b for b in held.eval_benchmarks()}
    assert benches["arith_val"].role == "VAL" and len(benches["arith_val"].problems) == 50
    val = {p.id for p in benches["arith_val"].problems}
    assert not val & {p.id for p in held.train_problems()}
    assert not val & {p.id for b in ("arith_id", "arith_ood") for p in benches[b].problems}
    # 930 ID-space problems - 200 ID: the train split of 730 loses exactly the validation problems
    assert len(plain.train_problems()) == 730 and len(held.train_problems()) == 680
    assert {p.id for p in plain.train_problems()} == val | {p.id for p in held.train_problems()}
    assert [p.id for p in held.train_problems()] == [p.id for p in plain.train_problems()][50:]
    with pytest.raises(HarnessError, match=r"suite.n_val must lie in \[0, 729\]"):
        SUITES.get("arith").Options(n_val=730).validate()


def test_protocol_suites_hold_validation_out_of_the_training_sets():
    shared = ROOT.parents[0] / "shared" / "data"
    cls = SUITES.get("math")

    def suite(n_val: int, seed: int = 0):
        return cls(cls.Options(data_dir=str(shared), id=("math500",), ood=(), n_val=n_val), seed)

    plain, held = suite(0), suite(40)
    val = held.eval_benchmarks()[-1]
    assert (val.name, val.role, len(val.problems)) == ("math_val", "VAL", 40)
    assert [b.name for b in plain.eval_benchmarks()] == ["math500"]
    val_ids = {p.id for p in val.problems}
    assert not val_ids & {p.id for p in held.train_problems()}
    assert {p.id for p in plain.train_problems()} == val_ids | {p.id for p in held.train_problems()}
    assert not val_ids & {p.id for p in held.eval_benchmarks()[0].problems}
    assert {p.id for p in suite(40, seed=5).eval_benchmarks()[-1].problems} == val_ids, "the same for every run seed"
    gold = val.problems[0]
    assert held.grade(f"\\boxed{{{gold.answer}}}", gold) == 1.0


# ---- selection on a hand-built tuning store ---------------------------------------------------

def plan(trials: int = 3, seeds=(10000, 10001)) -> Plan:
    draws = {"ppo": [{}, {"train.lr": 1e-4}, {"train.lr": 5e-4}][:trials],
             "grpo": [{}, {"train.lr": 2e-4}, {"train.lr": 6e-4}][:trials]}
    return Plan(suite="arith", algos=["ppo", "grpo"], trials=trials, search_seed=0, tune_seeds=list(seeds),
                report_seeds=[0, 1], noise=["none"], select=["arith_val"], draws=draws,
                defaults={"ppo": {"train.lr": 3e-4}, "grpo": {"train.lr": 3e-4}})


def write_cell(out: Path, algo: str, trial: int, seed: int, val: float | None, test: float, state: str = "done"):
    """A finished tuning cell: steps 0 and 4 evaluated; its final validation score `val` and
    ID/OOD scores `test` (chosen to disagree with validation, so selecting on them would differ)."""
    cell = store.cell_dir(out, "arith", trial_dir(algo, trial), "none", seed)
    cell.mkdir(parents=True)
    rows = []
    for step, scale in ((0, 0.0), (4, 1.0)):
        for bench, role, value in (("arith_id", "ID", test), ("arith_ood", "OOD", test), ("arith_val", "VAL", val)):
            if value is not None:
                rows.append({"step": step, "benchmark": bench, "role": role, "metric": "accuracy", "value": scale * value})
    (cell / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.write_status(cell, state, steps=4, **({"reason": "boom"} if state == "failed" else {}))


def synthetic_store(out: Path) -> Plan:
    p = plan()
    # (algo, trial): (validation per seed, ID/OOD per seed)
    table = {("ppo", 0): ((0.50, 0.60), 0.9), ("ppo", 1): ((0.70, 0.80), 0.1), ("ppo", 2): ((0.75, 0.70), 0.2),
             ("grpo", 0): ((0.40, 0.60), 0.9), ("grpo", 1): ((0.50, 0.50), 0.1), ("grpo", 2): ((0.90, 0.90), 0.1)}
    for (algo, trial), (vals, test) in table.items():
        for seed, val in zip(p.tune_seeds, vals):
            failed = algo == "grpo" and trial == 2 and seed == 10001
            write_cell(out, algo, trial, seed, val, test, "failed" if failed else "done")
    store.atomic_write_json(out / "tune.json", p.to_dict())
    return p


def test_selection_on_a_synthetic_store(tmp_path):
    p = synthetic_store(tmp_path)
    scores = cell_scores(tmp_path, p)
    assert len(scores) == 2 * 3 * 2
    ppo1 = scores[(scores["algo"] == "ppo") & (scores["trial"] == 1)].sort_values("seed")
    assert list(ppo1["score"]) == [0.70, 0.80] and list(ppo1["id_acc"]) == [0.1, 0.1]
    choices = select(scores, p)
    # ppo: means 0.55, 0.75, 0.725 -> trial 1, though trial 0 is far better on ID/OOD (0.9)
    assert choices["ppo"].trial == 1
    assert choices["ppo"].score == pytest.approx(0.75) and choices["ppo"].default_score == pytest.approx(0.55)
    assert choices["ppo"].values == {"train.lr": 1e-4}
    # grpo: trial 2 has the best validation mean of its done cell (0.9) but a failed cell: it cannot
    # win; trials 0 and 1 tie at 0.5 -> the lower trial, the defaults
    assert choices["grpo"].trial == 0 and choices["grpo"].values == {}
    assert choices["grpo"].table.loc[2, "state"].startswith("1 of 2 cell(s) failed")
    assert tuned_overrides(choices) == {"ppo.train.lr": 1e-4}


def test_selection_needs_a_trial_that_can_win(tmp_path):
    p = plan(trials=1, seeds=(10000,))
    write_cell(tmp_path, "ppo", 0, 10000, 0.5, 0.5)
    write_cell(tmp_path, "grpo", 0, 10000, None, 0.5)  # no validation score at all
    with pytest.raises(HarnessError, match="no trial of grpo can be selected"):
        select(cell_scores(tmp_path, p), p)


def test_tuning_report_on_the_synthetic_store(tmp_path):
    from reports.tuning import write_tuning_report

    synthetic_store(tmp_path / "tune")
    md = write_tuning_report(tmp_path / "tune", tmp_path / "report").read_text()
    assert "| 1 (chosen) | 0.0001 | 75.0 ± 7.1 (n=2) | 10.0 | 10.0 |  |" in md
    assert "| 0 defaults | 0.0003 | 55.0 ± 7.1 (n=2) | 90.0 | 90.0 |  |" in md
    assert "| ppo validation | 55.0 | 75.0 | +20.0" in md  # paired: +20, +20 -> no spread, no interval
    assert (tmp_path / "report" / "figures" / "sensitivity_ppo.png").stat().st_size > 1000


def test_tuned_grid_file_is_a_grid_file_run_takes(tmp_path):
    p = synthetic_store(tmp_path / "tune")
    choices = select(cell_scores(tmp_path / "tune", p), p)
    text = grid_file_text({"suite": "arith", "algos": "ppo,grpo", "seeds": [0, 1], "steps": 3,
                           "out": str(tmp_path / "tuned")}, {"train.eval_every": "2", **tuned_overrides(choices)},
                          choices, p, tmp_path / "tune")
    path = tmp_path / "tuned.yaml"
    path.write_text(text)
    parser = build_parser()
    defaults, overrides = file_defaults(subparser(parser, "run"), path)
    assert defaults["seeds"] == "0,1" and defaults["algos"] == "ppo,grpo"
    cells = build_cells("arith", ["ppo", "grpo"], "none", [0, 1], tmp_path / "tuned", steps=3, overrides=overrides)
    lrs = {(c.cfg.algo, c.cfg.seed): c.cfg.train.lr for c in cells}
    assert lrs == {("ppo", 0): 1e-4, ("ppo", 1): 1e-4, ("grpo", 0): 3e-4, ("grpo", 1): 3e-4}
    assert text.startswith("# Tuned by harness tune: 3 configurations per algorithm, selected on arith_val")


# ---- refusals: one line, exit 2, nothing written -----------------------------------------------

def tune_args(out: Path, cache_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["tune", "--algos", "ppo,grpo", "--noise", "none", "--seeds", "1", "--steps", str(steps),
            "--trials", "2", "--tune-seeds", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet",
            "--workers", "1", *fast_args({"suite.n_val": "16"}), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--select", "arith_id"], "--select arith_id: arith_id is a test benchmark (ID); tune selects on the validation "
                               "split only, never on the ID/OOD test benchmarks (valid: arith_val)"),
    (["--select", "arith_val,arith_ood"], "arith_ood is a test benchmark (OOD)"),
    (["--select", "OOD"], "OOD is a test benchmark (OOD)"),
    (["--select", "gsm8k"], "--select gsm8k: not a benchmark of this suite (valid: arith_val)"),
    (["--tune-seeds", "0,7"], "--tune-seeds 0,7 shares seed(s) 0 with the reporting --seeds"),
    (["--trials", "0"], "--trials must be a positive integer, got 0"),
    (["--tune-out", "RUNS"], "is the grid's run store or its tuned one"),
    (["--suite", "nosplit"], "suite 'nosplit' has no validation split, and tune never selects on its test benchmarks"),
    (["--set", "suite.n_val=0"], "suite.n_val=0 leaves no validation split to select on"),
])
def test_refusals_are_one_line_and_write_nothing(extra, message, tmp_path, cache_dir, capsys, monkeypatch):
    extra = [str(tmp_path / "runs") if a == "RUNS" else a for a in extra]
    # a suite without a validation split: arith's test benchmarks alone
    monkeypatch.setitem(SUITES._items, "nosplit", type("NoSplit", (SUITES.get("arith"),), {"validation_option": ""}))
    assert main(tune_args(tmp_path / "runs", cache_dir, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: ") and message in err, err
    assert not (tmp_path / "runs-tune").exists()


def test_tune_reads_a_grid_file_as_run_does():
    from harness.runfile import parse_with_file

    parser = build_parser()
    args, origin = parse_with_file(parser, subparser(parser, "tune"), ["tune", "--preset", "robustness", "--trials", "3"])
    assert (args.suite, args.noise, args.seeds, args.steps, args.out, args.trials) == (
        "chain", "none,flip0.2,pseudo8,weak_rm0.72", "12", None, "runs/robustness", 3)
    assert args.tune_seeds == "2" and origin is not None
    from harness.tune import file_options

    assert file_options(args, subparser(parser, "run"), "runs/robustness-tuned", ["ppo", "dfpo"]) == {
        "suite": "chain", "model": "tiny", "algos": ["ppo", "dfpo"], "noise": ["none", "flip0.2", "pseudo8", "weak_rm0.72"],
        "seeds": 12, "out": "runs/robustness-tuned"}


def test_tune_seeds_count_starts_at_the_base():
    assert parse_tune_seeds("2", [0, 1]) == [TUNE_SEED_BASE, TUNE_SEED_BASE + 1]
    assert parse_tune_seeds("50,51", [0, 1]) == [50, 51]


# ---- end to end: kill -9 mid-run, rerun, the same tuned grid file --------------------------------

E2E = {"model.warmstart_steps": "300", "suite.n_val": "16", "train.eval_every": "2"}

KILLED_TUNE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from harness.trainer import Trainer
    from harness.cli import main
    marker = Path(sys.argv[1])
    step = Trainer.train_step
    def stall(self, n):
        if n == 4 and self.cfg.algo == "grpo" and self.cell.parent.parent.name == "grpo.t01":
            marker.write_text("stalled")
            time.sleep(120)
        return step(self, n)
    Trainer.train_step = stall
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_kill_9_mid_tune_then_rerun_writes_the_same_choice(tmp_path, cache_dir, capsys):
    """2 algorithms x 2 configurations x 1 tuning seed x 4 steps (checkpoints every 2): a tune
    killed inside its last cell at step 4 and run again writes the file an uninterrupted one does."""
    out = tmp_path / "runs"
    args = tune_args(out, cache_dir, "--ckpt-every", "2", *(a for k, v in E2E.items() for a in ("--set", f"{k}={v}")),
                     steps=4)
    assert main(args) == 0
    reference = (tmp_path / "runs-tune" / "tuned.yaml").read_text()
    ref_evals = {c: (tmp_path / "runs-tune" / c / "eval.jsonl").read_text()
                 for c in ("arith/ppo.t01/none/seed10000", "arith/grpo.t01/none/seed10000")}
    (tmp_path / "runs-tune").rename(tmp_path / "reference-tune")
    capsys.readouterr()

    kill_9_when_stalled(KILLED_TUNE, tmp_path / "stalled", args, 300, "the tune")
    tune = tmp_path / "runs-tune"
    assert not (tune / "tuned.yaml").exists()
    assert checkpoints.latest_checkpoint(tune / "arith/grpo.t01/none/seed10000")[0] == 2

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "resuming from the checkpoint at step 2 of 4" in printed
    assert "tune: 1 cells done, 3 already done, 0 failed" in printed
    assert (tune / "tuned.yaml").read_text() == reference
    for cell, text in ref_evals.items():
        assert (tune / cell / "eval.jsonl").read_text() == text
    assert not math.isnan(json.loads((tune / "tune.json").read_text())["defaults"]["ppo"]["train.lr"])


# ---- the report: tuned and default reporting stores side by side ---------------------------------

def write_run(out: Path, algo: str, seed: int, score: float) -> None:
    """A finished reporting cell with final ID and OOD score `score` (step 0: half of it)."""
    cell = store.cell_dir(out, "arith", algo, "none", seed)
    cell.mkdir(parents=True)
    rows = [{"step": step, "benchmark": f"arith_{r.lower()}", "role": r, "metric": "accuracy", "value": v}
            for step, v in ((0, score / 2), (4, score)) for r in ("ID", "OOD")]
    (cell / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.write_status(cell, "done", steps=4)


def test_report_puts_tuned_and_default_stores_side_by_side(tmp_path, capsys):
    synthetic_store(tmp_path / "tune")
    for seed, (default, tuned) in enumerate(((0.50, 0.60), (0.40, 0.60), (0.60, 0.70))):
        write_run(tmp_path / "default", "ppo", seed, default)
        write_run(tmp_path / "tuned", "ppo", seed, tuned)
    write_run(tmp_path / "default", "ppo", 3, 0.10)  # a seed the tuned store lacks: in no column
    for args, message in ((["--default-runs", str(tmp_path / "default")], "--default-runs needs --tuning"),
                          (["--tuning", str(tmp_path / "default")], "is not a tuning store (no tune.json"),
                          (["--tuning", str(tmp_path / "tune"), "--default-runs", str(tmp_path / "nope")],
                           "no such run store")):
        assert main(["report", "--runs", str(tmp_path / "tuned"), *args]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "tuned" / "report").exists()
    assert main(["report", "--runs", str(tmp_path / "tuned"), "--format", "md", "--tuning", str(tmp_path / "tune"),
                 "--default-runs", str(tmp_path / "default")]) == 0
    md = (tmp_path / "tuned" / "report" / "tuning.md").read_text()
    # paired differences +10, +20, +10: mean 13.3, sd 5.77, t(0.975, 2) = 4.303 -> half-width 14.3
    assert "| ppo none ID | 50.0 | 63.3 | +13.3 [-1.0, +27.7] | 3 |" in md
    assert "| ppo none OOD | 50.0 | 63.3 | +13.3 [-1.0, +27.7] | 3 |" in md
    assert "figures/sensitivity_ppo.png" not in md, "--format md: no figures"
