"""Every command as safe as `harness run`: `eval`, `plan`, `bench`, grid files and model folders under
bad input. Each case asserts the exit status, one line on stderr (of bounded length), no traceback,
and that nothing was written or changed.

One tiny run makes a template store (module fixture): `arith/grpo/none/seed0`, finished (2 steps)
with its model saved (`--save-model final`). Cases copy it, or a model folder made from its
`model/`, damage one thing, and call the CLI in-process (a few run it under a terminal).
"""
from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import store
from harness.cli import main
from tests.conftest import FAST, fast_args

ROOT = Path(__file__).resolve().parents[1]
CELL = "arith/grpo/none/seed0"
MAX_LINE = 2000


def run_args(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["run", "--algos", "grpo", "--noise", "none", "--seeds", "1", "--steps", "2", "--out", str(out),
            "--cache-dir", str(cache_dir), "--quiet", "--workers", "1", *fast_args(), *extra]


def eval_args(model: str, out: Path, cache_dir: Path, *extra: str) -> list[str]:
    warm_start = ("model.warmstart_steps", "suite.n_eval", "suite.n_train")  # the run's, so its cached warm start serves
    return ["eval", "--model", model, "--out", str(out), "--cache-dir", str(cache_dir),
            *[a for key in warm_start for a in ("--set", f"{key}={FAST[key]}")], *extra]


@pytest.fixture(scope="module")
def template(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("template") / "runs"
    assert main(run_args(out, cache_dir, "--save-model", "final")) == 0
    assert json.loads((out / CELL / "status.json").read_text())["state"] == "done"
    return out


@pytest.fixture
def runs(template, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(template, out)
    return out


@pytest.fixture
def model(template, tmp_path):
    """A complete model folder (the template cell's saved model), to damage."""
    folder = tmp_path / "model"
    shutil.copytree(template / CELL / "model", folder)
    return folder


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` with its bytes and mode: a store byte for byte."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def invoke(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("harness: error: "), err
        assert len(err) <= MAX_LINE + 20, f"an error line of {len(err)} characters"
    return code, out, err


def refused(capsys, args: list[str], message: str, *untouched: Path) -> str:
    """`args` ends with exit 2 and one line holding `message`, and every path in `untouched` is as it was
    (a folder that did not exist still does not)."""
    before = {p: snapshot(p) if p.is_dir() else p.exists() for p in untouched}
    code, out, err = invoke(capsys, args)
    assert code == 2, out + err
    assert message in err, err
    for p, was in before.items():
        assert (snapshot(p) if p.is_dir() else p.exists()) == was, f"{p} changed"
    return err


# ---- 1. harness eval never writes over a trained cell, nor outside a store -----------------------------

def test_eval_with_every_name_of_a_trained_store_leaves_it_byte_for_byte(runs, cache_dir, capsys):
    from algorithms import ALGOS

    names = {p.relative_to(runs).parts[1] for p in runs.glob("*/*/*/seed*")}  # every cell's algorithm folder
    assert names == {"grpo"}
    names |= set(ALGOS.names())  # and every name a later `harness run` would train into
    names |= {".", "..", "", "a/b", "../grpo", "grpo/..", "x\ty", "x\n", "x\x7f", ".hidden", "x" * 101,
              store.MARKER_NAME}
    before = snapshot(runs)
    for model in ("tiny", str(runs / CELL / "model")):
        for name in sorted(names):
            err = refused(capsys, eval_args(model, runs, cache_dir, "--name", name), "--name")
            assert "harness eval never writes" in err or "--name must be a non-empty name without '/'" in err, err
    assert snapshot(runs) == before, "the store changed"


def test_eval_writes_a_new_row_beside_the_trained_cell_and_replaces_only_its_own(runs, cache_dir, capsys):
    before = snapshot(runs / CELL)
    model = str(runs / CELL / "model")
    for _ in range(2):  # the second replaces the first row, nothing else
        code, out, err = invoke(capsys, eval_args(model, runs, cache_dir))
        assert code == 0, err
    row = runs / "arith/grpo-model/none/seed0"
    assert json.loads((row / "status.json").read_text())["evaluated_model"] == model
    assert snapshot(runs / CELL) == before
    code, out, _ = invoke(capsys, ["status", "--out", str(runs)])
    assert code == 0 and "grpo/none/seed0" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("arith/grpo/none/seed0")] == ["done"]
    # files of a row, and of a saved model, are readable by others as the umask allows (not 0600/0700)
    umask = os.umask(0)
    os.umask(umask)
    for path in [row / "status.json", row / "config.json", row / "eval.jsonl", runs / CELL / "model" / "model.safetensors",
                 runs / CELL / "status.json", runs / CELL / "config.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in (row, runs / CELL / "model"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path


def test_eval_over_a_folder_that_is_not_a_row_is_refused(runs, cache_dir, capsys):
    other = runs / "arith/base/none/seed0"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    refused(capsys, eval_args("tiny", runs, cache_dir), "exists and is not an evaluation row", runs)


def test_eval_into_a_folder_of_the_users_is_refused_and_left_untouched(tmp_path, cache_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.jsonl").write_text("my rows\n")
    (mine / "config.json").write_text("{}\n")
    refused(capsys, eval_args("tiny", mine, cache_dir), "is a non-empty folder that is not a harness run store", mine)


# ---- 2. model folders: no code runs, every damage one line --------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_config(**changes):
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _only_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 pickled")


def _empty(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


# (name, damage, message, whether `harness plan` (which reads only config.json) refuses it too)
FOLDER_CASES = [
    ("empty", _empty, "has no config.json", True),
    ("no-config", lambda f: (f / "config.json").unlink(), "has no config.json", True),
    ("config-not-json", lambda f: (f / "config.json").write_text("{oops"), "malformed JSON", True),
    ("config-a-list", lambda f: (f / "config.json").write_text("[1]"), "expected an object, found a list", True),
    ("config-not-utf8", lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xff"}'), "not UTF-8", True),
    ("config-no-model-type", _set_config(model_type=None), "without a model_type", True),
    ("negative-size", _set_config(hidden_size=-64), "hidden_size must be in 1..131072, got -64", True),
    ("size-a-string", _set_config(hidden_size="big"), 'hidden_size must be a positive integer, got "big"', True),
    ("10^12-layers", _set_config(num_hidden_layers=10 ** 12), "num_hidden_layers must be in 1..1024", True),
    ("auto-map", _set_config(auto_map={"AutoModelForCausalLM": "custom.Model"}), "--trust-remote-code", True),
    ("truncated-safetensors", lambda f: _truncate(f / "model.safetensors"), "truncated", False),
    ("random-bytes-safetensors", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)),
     "not a safetensors file", False),
    ("empty-safetensors", lambda f: (f / "model.safetensors").write_bytes(b""), "not a safetensors file", False),
    ("pickle-weights", _only_pickle, "holds only pickle weights (pytorch_model.bin)", False),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), "has no weights", False),
    ("no-tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
     "has no tokenizer files", False),
]


def command_args(command: str, folder: Path, out: Path, cache_dir: Path) -> list[str]:
    return {
        "run": ["run", "--model", str(folder), "--algos", "grpo", "--steps", "1", "--out", str(out), "--quiet"],
        "eval": ["eval", "--model", str(folder), "--out", str(out), "--cache-dir", str(cache_dir)],
        "plan": ["plan", "--model", str(folder), "--algos", "grpo"],
        "bench": ["bench", "--model", str(folder), "--quick", "--no-trl", "--cache-dir", str(cache_dir)],
    }[command]


@pytest.mark.parametrize("name, damage, message, plan_too", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_damaged_model_folder_is_one_line_in_every_command(name, damage, message, plan_too, model, tmp_path,
                                                           cache_dir, capsys):
    damage(model)
    out = tmp_path / "out"
    for command in ("run", "eval", "plan", "bench"):
        args = command_args(command, model, out, cache_dir)
        if command == "plan" and not plan_too:  # a plan needs the config only, and makes one
            code, text, _ = invoke(capsys, args)
            assert code in (0, 1) and "harness plan:" in text
            continue
        err = refused(capsys, args, message, out, model)
        assert str(model) in err or "config.json" in err


def test_a_cell_folder_as_a_model_names_its_saved_model(runs, tmp_path, cache_dir, capsys):
    cell = runs / CELL
    for command in ("run", "eval", "plan", "bench"):
        refused(capsys, command_args(command, cell, tmp_path / "out", cache_dir),
                f"is a run store cell, not a model folder: its trained model is {str(cell / 'model')!r}", runs)


CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig
class CustomConfig(LlamaConfig):
    model_type = "harness_custom_test"
"""


def custom_code_folder(model: Path, marker: Path) -> Path:
    """A model folder whose config asks for its own Python code; importing that code writes `marker`."""
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="harness_custom_test", auto_map={"AutoConfig": "custom.CustomConfig",
                                                              "AutoModelForCausalLM": "custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {"AutoTokenizer": ["custom.Tok", None]}}))
    (model / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return model


def under_a_terminal(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdin, stdout and stderr (as a user at a shell);
    answer nothing; return (exit status, everything it printed)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, env=env, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_folders_own_code_never_runs_and_nothing_asks_on_a_terminal(model, tmp_path):
    marker = tmp_path / "code-ran"
    folder = custom_code_folder(model, marker)
    python = [sys.executable, "-m", "harness.cli"]
    for args in (["eval", "--model", str(folder), "--out", str(tmp_path / "out")], ["plan", "--model", str(folder)],
                 ["run", "--model", str(folder), "--algos", "grpo", "--steps", "1", "--out", str(tmp_path / "out")]):
        code, text = under_a_terminal(python + args)
        assert code == 2, text
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("harness: error: "), text
        assert "--trust-remote-code" in text and "[y/N]" not in text and "Traceback" not in text
        assert not marker.exists() and not (tmp_path / "out").exists()
    # Past the folder check (as a hub id would be), transformers itself is told trust_remote_code=False.
    script = ("import sys, harness.model_folder as m\n"
              "m.check_model_folder = lambda *a, **k: {}\n"
              "from harness.models import load_pretrained\n"
              "from harness.errors import HarnessError\n"
              f"try:\n    load_pretrained({str(folder)!r}, 'float32', 'cpu')\n"
              "except HarnessError as exc:\n    print('refused:', exc); sys.exit(2)\n")
    code, text = under_a_terminal([sys.executable, "-c", script])
    assert code == 2 and "refused:" in text and "[y/N]" not in text, text
    assert not marker.exists()


# ---- 3. bounds: numbers from the command line, --set, grid files and model configs ----------------------

@pytest.mark.parametrize("args, message", [
    (["run", "--set", "train.threads=100000"], f"train.threads must be at most {os.cpu_count()} (this machine's CPU count)"),
    (["run", "--set", "train.prompts_per_step=100000000000000000000"], "train.prompts_per_step must be at most 1000000"),
    (["run", "--set", "train.prompts_per_step=1e20"], "not a valid int"),
    (["run", "--set", "train.prompts_per_step=100000", "--set", "train.group_size=4096"],
     "train.prompts_per_step x train.group_size must be at most 10000000"),
    (["run", "--steps", "100000000000000000000000000"], "train.steps must be at most 10000000"),
    (["run", "--set", "eval.batch_size=10000000000"], "eval.batch_size must be at most 1000000"),
    (["run", "--set", "model.num_layers=1000000000000"], "model.num_layers must be at most 1024"),
    (["run", "--set", "model.hidden_size=-5"], "model.hidden_size must be a positive integer, got -5"),
    (["run", "--algos", "grpo", "--set", "grpo.max_extra_rounds=1000000000000"],
     "grpo.max_extra_rounds must be in -10000000..10000000"),
    (["run", "--set", "suite.n_train=100000000000"], "suite.n_train must be in -10000000..10000000"),
    (["run", "--workers", "100000"], "--workers must be at most 1024"),
    (["run", "--ckpt-every", "100000000000"], "--ckpt-every must be at most 10000000"),
    (["eval", "--model", "tiny", "--seed", "-1"], "--seed must be in 0.."),
    (["eval", "--model", "tiny", "--set", "eval.limit=1000000000000"], "eval.limit must be at most 100000000"),
])
def test_number_past_its_bound_is_refused_before_anything_is_written(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, [*args, "--out", str(out)], message, out)


@pytest.mark.parametrize("args, message", [
    (["plan", "--set", "model.hidden_size=-5"], "model.hidden_size must be a positive integer, got -5"),
    (["plan", "--set", "model.hidden_size=big"], "--set model.hidden_size='big': not a valid int"),
    (["plan", "--set", "model.num_layers=1000000000000"], "model.num_layers must be at most 1024"),
    (["plan", "--set", "model.num_heads=3"], "must be a multiple of model.num_heads"),
    (["plan", "--nproc", "100000"], "train.nproc must be at most 4096"),
    (["plan", "--prompt-len", "1000000000"], "--prompt-len must be at most 1048576"),
    (["plan", "--measure", "10000000"], "--measure must be at most 100000"),
    (["plan", "--device-memory=-80GB"], "--device-memory '-80GB'"),
    (["plan", "--device-memory", "1e30GB"], "expected a positive size up to 1024TB"),
    (["bench", "--steps", "1000000000"], "--steps must be at most 100000"),
    (["bench", "--set", "train.threads=100000"], "train.threads must be at most"),
])
def test_plan_and_bench_numbers_are_bounded(args, message, capsys):
    refused(capsys, args, message)


# ---- grid files: size, depth, aliases, encoding ----------------------------------------------------------

def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["grpo", "grpo", "grpo", "grpo", "grpo", "grpo", "grpo", "grpo", "grpo", "grpo"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nalgos: *a{levels}\n"


# (name, content, message, whether reading the file is what fails: `harness report --config` refuses it too)
GRID_FILE_CASES = [
    ("not-utf8", b'algos: "grpo\xff"\n', "not UTF-8 text (byte 12, line 1)", True),
    ("nested-3000", ("algos: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested more than 32 levels deep", True),
    ("alias-bomb-10^8", alias_bomb(7).encode(), "more than 16 YAML aliases", True),
    ("alias-bomb-10^5", alias_bomb(4).encode(), "more than 16 YAML aliases", True),
    ("wide-aliases", ("a: &a [" + ", ".join(["grpo"] * 10_000) + "]\nalgos: [" + ", ".join(["*a"] * 11) + "]\n").encode(),
     "more than 100000 values", True),
    ("over-1MB", b"#" * (1024 * 1024 + 1), "a grid file is at most 1048576 bytes", True),
    ("huge-value-in-an-error", ("algos: [" + ", ".join(["grpo"] * 10_000) + "]\n").encode(), "lists an algorithm twice",
     False),
    ("steps-10^26", b"steps: 100000000000000000000000000\n", "train.steps must be at most 10000000", False),
    ("threads-in-set", b"set:\n  train:\n    threads: 100000\n", "train.threads must be at most", False),
]


@pytest.mark.parametrize("name, content, message, reading", GRID_FILE_CASES, ids=[c[0] for c in GRID_FILE_CASES])
def test_grid_file_is_read_within_limits(name, content, message, reading, tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_bytes(content)
    out = tmp_path / "out"
    start = time.monotonic()
    refused(capsys, ["run", "--config", str(path), "--out", str(out)], message, out)
    if reading:
        refused(capsys, ["report", "--config", str(path)], message, out)
    assert time.monotonic() - start < 30


def test_a_few_aliases_still_work(tmp_path):
    from harness.runfile import read_mapping

    path = tmp_path / "grid.yaml"
    path.write_text("x: &algos [grpo, ppo]\nalgos: *algos\n")
    assert read_mapping(path) == {"x": ["grpo", "ppo"], "algos": ["grpo", "ppo"]}


# ---- 4. the small items ----------------------------------------------------------------------------------

def test_log_to_with_an_empty_item_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, ["run", "--log-to", "tensorboard,,wandb", "--out", str(out)], "--log-to has an empty item", out)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_report_removes_the_temporary_folders_of_a_report_that_died(runs, capsys):
    from reports.tables import _host

    dead = runs / f".report.tmp-{dead_pid()}@{_host()}-abc"
    alive = runs / f".report.tmp-{os.getpid()}@{_host()}-def"  # a report still being written
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "report.md").write_text("half")
    assert invoke(capsys, ["report", "--runs", str(runs), "--format", "csv"])[:3:2] == (0, "")  # no cell corrupt
    assert not dead.exists() and alive.exists()
    assert (runs / "report" / "csv" / "cells.csv").exists()


def rewrite(path: Path, index: int, change) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[index])
    lines[index] = json.dumps(change(row))
    path.write_text("\n".join(lines) + "\n")


def repeat_line(path: Path, index: int) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[index]]) + "\n")


REPORT_CASES = [
    ("eval-value-a-string", "eval.jsonl", lambda p: rewrite(p, 0, lambda r: {**r, "value": "abc"}),
     "'value' must be a number or null, found 'abc'"),
    ("metric-a-string", "metrics.jsonl", lambda p: rewrite(p, 1, lambda r: {**r, "loss/actor": "abc"}),
     "row 2: metric 'loss/actor' must be a number or null, found 'abc'"),
    ("metrics-step-twice", "metrics.jsonl", lambda p: repeat_line(p, 0), "row 3 repeats step 1 (row 1)"),
    ("eval-row-twice", "eval.jsonl", lambda p: repeat_line(p, 0), "repeats row 1"),
]


@pytest.mark.parametrize("name, file, damage, message", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_calls_a_cell_with_bad_values_corrupt(name, file, damage, message, runs, capsys, recwarn):
    damage(runs / CELL / file)
    code, out, err = invoke(capsys, ["report", "--runs", str(runs), "--format", "md,csv"])
    assert code == 0
    assert err.count("\n") == 1 and f"harness: warning: 1 cell(s) skipped, their files are corrupt: {CELL}: " in err
    assert message in err
    assert "inf" not in (runs / "report" / "csv" / "main.csv").read_text()
    assert not [w for w in recwarn if "RuntimeWarning" in w.category.__name__]


def test_sigterm_on_eval_is_the_one_line_interrupted_message(runs, cache_dir, capsys, monkeypatch):
    from harness.model_eval import ModelEvaluation

    def terminated(self, step):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(ModelEvaluation, "evaluate", terminated)
    before = snapshot(runs)
    code, _, err = invoke(capsys, eval_args("tiny", runs, cache_dir))
    assert code == 130
    assert err.count("\n") == 1 and err.startswith("harness: interrupted: the evaluation stopped; no row was written")
    assert snapshot(runs) == before


def test_node_0_says_whom_it_waits_for(capsys, monkeypatch):
    import torch.distributed.launcher.api as api

    from harness.config import RunConfig
    from harness.cell import Cell, NodeLaunch
    from harness.launch import launch_torchrun

    monkeypatch.setattr(api, "elastic_launch", lambda config, entry: lambda *args: None)
    for nnodes, rank, line in [(2, 0, "waiting for node 1 of 2 at node0.cluster:29500"),
                               (3, 0, "waiting for nodes 1-2 of 3 at node0.cluster:29500"),
                               (2, 1, "node 1 of 2 joining node 0 at node0.cluster:29500")]:
        cfg = RunConfig(suite="arith", algo="grpo", noise="none", seed=0)
        cfg.train.nnodes = nnodes
        cell = Cell(cfg, Path("/nonexistent"), node=NodeLaunch(rank=rank, endpoint="node0.cluster:29500"))
        assert launch_torchrun(cell, Path("/nonexistent")) == {}
        assert f"cell {CELL}: {line}" in capsys.readouterr().out


def test_list_into_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    """`harness list config | head`: the reader is gone before the writer is done."""
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["list", "config"]) == 141
        monkeypatch.undo()
        assert capsys.readouterr().err == ""
        os.dup2(os.open(os.devnull, os.O_WRONLY), pipe.fileno())  # what main did: nothing more to flush at close


def test_a_cell_that_failed_earlier_is_left_with_a_hint(runs, cache_dir, capsys):
    status = json.loads((runs / CELL / "status.json").read_text())
    (runs / CELL / "status.json").write_text(json.dumps({**status, "state": "failed", "step": 1,
                                                         "reason": "bad value"}))
    code, out, _ = invoke(capsys, run_args(runs, cache_dir, "--set", "train.lr=1e-4"))
    assert code == 1
    assert (f"cell {CELL}: failed earlier (at step 1: bad value); its configuration has changed since; left as it "
            "is: --retry-failed re-runs it") in out


def test_two_workers_say_the_warm_start_is_trained_first(tmp_path, capsys, monkeypatch):
    import harness.grid

    monkeypatch.setattr(harness.grid, "run_processes", lambda todo, *a, **k: [])
    args = run_args(tmp_path / "runs", tmp_path / "empty-cache", "--workers", "2", "--seeds", "2")
    code, out, _ = invoke(capsys, args)
    assert code == 0
    assert "training the tiny model's warm start first (2 of them, 30 supervised steps each, once; cached in " in out
