"""`harness run` / `harness report` / `harness list` through the command line, and bad input."""
from __future__ import annotations

import json

import pytest

from algorithms import ALGOS
from harness.cli import main
from tests.conftest import fast_args


def test_run_then_report_end_to_end(tmp_path, cache_dir, capsys):
    out = tmp_path / "runs"
    args = ["run", "--algos", "ppo,grpo", "--noise", "none,flip0.2", "--seeds", "1", "--steps", "2",
            "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", *fast_args()]
    assert main(args) == 0
    cells = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*/seed*"))
    assert cells == ["arith/grpo/flip0.2/seed0", "arith/grpo/none/seed0", "arith/ppo/flip0.2/seed0", "arith/ppo/none/seed0"]
    for cell in out.glob("*/*/*/seed*"):
        assert json.loads((cell / "status.json").read_text())["state"] == "done"
        assert len((cell / "metrics.jsonl").read_text().splitlines()) == 2

    # A second run skips the finished cells and changes nothing.
    before = {p: p.read_text() for p in out.rglob("metrics.jsonl")}
    assert main(args) == 0
    assert "0 done, 4 already done" in capsys.readouterr().out
    assert before == {p: p.read_text() for p in out.rglob("metrics.jsonl")}

    assert main(["report", "--runs", str(out), "--format", "md", "--baseline", "grpo"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "#### ALL AVG: each algorithm minus grpo" in report
    assert "## arith" in report
    for algo in ("ppo", "grpo"):
        for noise in ("none", "flip0.2"):
            assert f"| {algo} | {noise} | 1 |" in report


def test_list_commands(capsys):
    from noise import NOISE
    from tasks import SUITES

    for what, expected in (("algos", ALGOS.names()), ("suites", SUITES.names()),
                           ("noise", [NOISE.get(n).usage() for n in NOISE.names()])):
        assert main(["list", what]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == expected, what


@pytest.mark.parametrize("args, message", [
    (["run", "--algos", "foo"], f"unknown algorithm 'foo' (valid: {', '.join(ALGOS.names())})"),
    (["run", "--suite", "nope"], "unknown suite 'nope' (valid: arith"),
    (["run", "--noise", "bogus0.1"], "unknown noise 'bogus'"),
    (["run", "--noise", "flip1.5"], "out of range [0, 1]"),
    (["run", "--steps", "0"], "--steps must be a positive integer"),
    (["run", "--seeds", "x"], "--seeds takes a count"),
    (["run", "--set", "train.lr=abc"], "train.lr"),
    (["run", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    (["run", "--set", "ppo.gamma=2"], "gamma and lam must lie in [0, 1]"),
    (["run", "--algos", "grpo", "--set", "algo.gamma=0.9"], "option of none of: grpo"),
    (["run", "--set", "suite.verbose_frac=1.5"], "verbose_frac"),
    (["run", "--algos", "ppo,,grpo"], "--algos has an empty item in 'ppo,,grpo'"),
    (["run", "--algos", "ppo,"], "--algos has an empty item in 'ppo,'"),
    (["run", "--seeds", "0,,1"], "--seeds has an empty item"),
    (["run", "--suite", "math", "--id", "math500,,aime24"], "--set suite.id='math500,,aime24': an empty item"),
    (["run", "--model", "./no-such-model"], "--model './no-such-model': no such folder"),
    (["run", "--model", "/no/such/model"], "--model '/no/such/model': no such folder"),
    (["run", "--set", "model.name=~/no-such-model"], "no such folder"),
    (["report", "--runs", "does-not-exist"], "no runs found"),
    (["list", "things"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "run":
        args = [*args, "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []
