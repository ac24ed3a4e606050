"""Values and benchmark files checked before anything is written: one line `harness: error: ...`
saying what is wrong and what is valid, exit 2, no folder created."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from algorithms import ALGOS
from algorithms.base import Batch
from harness.cli import main
from harness.errors import HarnessError
from harness.resolver import build_cells

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def refused(capsys, args: list[str], out: Path) -> str:
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: "), err
    assert not out.exists(), "nothing written"
    return err


@pytest.mark.parametrize("args, message", [
    (["--set", "train.max_grad_norm=-1"], "train.max_grad_norm must be > 0, got -1.0"),
    (["--set", "train.max_grad_norm=0"], "train.max_grad_norm must be > 0, got 0.0"),
    (["--set", "train.max_grad_norm=nan"], "--set train.max_grad_norm='nan': must be a finite number"),
    (["--set", "eval.temperature=nan"], "--set eval.temperature='nan': must be a finite number"),
    (["--set", "train.temperature=nan"], "--set train.temperature='nan': must be a finite number"),
    (["--set", "train.lr=inf"], "--set train.lr='inf': must be a finite number"),
    (["--set", "train.lr=1e999"], "must be a finite number"),
    (["--set", "train.weight_decay=-0.1"], "train.weight_decay must be >= 0, got -0.1"),
    (["--algos", "grpo", "--set", "grpo.kl_coef=nan"], "--set grpo.kl_coef='nan': must be a finite number"),
    (["--algos", "grpo", "--set", "grpo.kl_coef=-0.5"], "grpo.kl_coef must be >= 0, got -0.5"),
    (["--algos", "ppo", "--set", "ppo.entropy_coef=-1"], "ppo.entropy_coef must be >= 0, got -1.0"),
    (["--algos", "grpo", "--set", "train.group_size=1"],
     "grpo compares the samples of a group: train.group_size must be >= 2 (a group of 1 trains nothing), got 1"),
    (["--noise", "gauss1e300"], "characters long written out"),
    (["--seeds", "0,99999999999999999999"], "--seeds must be below 2**63"),
])
def test_bad_value_is_refused_before_anything_is_written(args, message, tmp_path, capsys):
    assert message in refused(capsys, ["run", *args], tmp_path / "runs")


@pytest.mark.parametrize("name", ALGOS.names())
def test_group_size_one_is_refused_exactly_by_algorithms_whose_advantage_it_zeroes(name, tmp_path):
    """For every registered algorithm: with groups of one response, an algorithm that asks for
    group_size >= 2 gets all-zero advantages (it would train nothing) and refuses group_size 1;
    the others accept it."""
    algo = ALGOS.get(name)(ALGOS.get(name).Options())
    if algo.min_group_size() == 1:
        assert build_cells("arith", [name], "none", [0], tmp_path, overrides={"train.group_size": "1"})
        return
    with pytest.raises(HarnessError, match="train.group_size must be >= 2"):
        build_cells("arith", [name], "none", [0], tmp_path, overrides={"train.group_size": "1"})
    B, T = 4, 3
    mask = torch.ones(B, T)
    batch = Batch(scores=torch.tensor([1.0, 0.0, 1.0, 0.5]), clean_scores=torch.zeros(B), group_ids=torch.arange(B),
                  response_mask=mask, old_logp=torch.zeros(B, T), ref_logp=torch.zeros(B, T), prompt_len=2)
    algo.advantages(batch)
    assert torch.count_nonzero(batch["advantages"]) == 0
    batch = Batch(scores=torch.tensor([1.0, 0.0, 1.0, 0.5]), clean_scores=torch.zeros(B),
                  group_ids=torch.tensor([0, 0, 1, 1]), response_mask=mask, old_logp=torch.zeros(B, T),
                  ref_logp=torch.zeros(B, T), prompt_len=2)
    algo.advantages(batch)
    assert torch.count_nonzero(batch["advantages"]) > 0, "groups of two do train"


# ---- benchmark files ---------------------------------------------------------------------------------

def math_rows(n: int, prefix: str) -> list[dict]:
    return [{"problem": f"What is {i} + 1?", "answer": str(i + 1), "unique_id": f"{prefix}{i}"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_args(data: Path) -> list[str]:
    return ["run", "--suite", "math", "--data-dir", str(data), "--train-data", "math_train", "--id", "math500",
            "--ood", "", "--algos", "grpo", "--steps", "1"]


def _replace_line(path: Path, index: int, raw: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[index] = raw
    path.write_bytes(b"".join(lines))


DATA_CASES = [
    ("garbage-line-5", lambda p: _replace_line(p, 4, b"garbage\n"), "'{}' line 5: malformed JSON"),
    ("half-last-line", lambda p: p.write_bytes(p.read_bytes() + b'{"problem": "x", "ans'), "'{}' line 7: malformed JSON"),
    ("not-utf8-line-3", lambda p: _replace_line(p, 2, b'{"problem": "\xff"}\n'), "'{}' line 3: not UTF-8 text"),
    ("a-list-line-2", lambda p: _replace_line(p, 1, b"[1, 2]\n"), "'{}' line 2: expected a JSON object"),
    ("missing-answer", lambda p: _replace_line(p, 3, b'{"problem": "What?", "unique_id": "x"}\n'), "has no gold answer"),
    ("duplicate-id", lambda p: _replace_line(p, 3, json.dumps(math_rows(1, "e")[0]).encode() + b"\n"),
     "repeats the id 'e0'"),
]


@pytest.mark.parametrize("name, corrupt, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_malformed_benchmark_file_stops_the_run_before_any_cell(name, corrupt, message, tmp_path, capsys):
    data = tmp_path / "data"
    write_jsonl(data / "math" / "math_train.jsonl", math_rows(8, "t"))
    bench = write_jsonl(data / "math" / "math500.jsonl", math_rows(6, "e"))
    corrupt(bench)
    err = refused(capsys, math_args(data), tmp_path / "runs")
    assert "benchmark math500: " in err and message.replace("{}", str(bench)) in err


def test_csv_row_with_more_fields_than_the_header_is_refused(tmp_path, capsys):
    rows = list(csv.reader((FIXTURES / "gpqa_synthetic.csv").open(newline="")))
    rows[2] = rows[2] + ["one field too many"]
    path = tmp_path / "gpqa.csv"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    from tasks.data import BENCHMARKS, DataSources

    with pytest.raises(HarnessError, match=rf"benchmark gpqa: '{path}' line 3: 9 fields, the header has 8"):
        DataSources(paths={"gpqa": str(path)}).check(BENCHMARKS.get("gpqa"), "ID", "--id")
    rows[2] = rows[2][:-1]  # fixed: read as the header says (pandas used to shift such a row by a column)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    problems = DataSources(paths={"gpqa": str(path)}).problems(BENCHMARKS.get("gpqa"))
    assert problems[1].id.endswith("recSyn002") and "blueium" in problems[1].prompt
