"""The run store under corruption and bad input: every case ends in a correct recovery or one line
`harness: error: ...`, never a traceback, and no finished data is lost.

One tiny run makes a template store (module fixture): `arith/grpo/none/seed0` finished (4 steps),
`arith/grpo/none/seed1` interrupted at step 4 with checkpoints at steps 2 and 3. Each case copies
it, corrupts one file, and calls the CLI in-process.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from harness import checkpoints, store
from harness.cli import main
from harness.trainer import Trainer
from tests.conftest import fast_args

DONE, UNFINISHED = "arith/grpo/none/seed0", "arith/grpo/none/seed1"
STEPS = 4


def run_args(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["run", "--algos", "grpo", "--noise", "none", "--seeds", "2", "--steps", str(STEPS), "--ckpt-every", "1",
            "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", "--workers", "1", *fast_args(), *extra]


@pytest.fixture(scope="module")
def template(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("template") / "runs"
    step = Trainer.train_step

    def interrupt_seed1_at_last_step(self, n):
        if self.cfg.seed == 1 and n == STEPS:
            raise KeyboardInterrupt
        return step(self, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", interrupt_seed1_at_last_step)
        assert main(run_args(out, cache_dir)) == 130  # the CLI's exit code for an interrupted run
    assert json.loads((out / DONE / "status.json").read_text())["state"] == "done"
    assert json.loads((out / UNFINISHED / "status.json").read_text())["state"] == "interrupted"
    assert [s for s, _ in checkpoints.checkpoints(out / UNFINISHED)] == [3, 2]
    return out


@pytest.fixture
def runs(template, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(template, out)
    return out


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def snapshot(cell: Path) -> dict[str, bytes]:
    return {p.relative_to(cell).as_posix(): p.read_bytes() for p in sorted(cell.rglob("*")) if p.is_file()}


def invoke(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("harness: error: "), err
    return code, out, err


def assert_finished_cell_kept(template: Path, runs: Path, corrupted: str | None = None) -> None:
    before, after = snapshot(template / DONE), snapshot(runs / DONE)
    for name in set(before) | set(after):
        if name != corrupted:
            assert before.get(name) == after.get(name), f"{DONE}/{name} changed"


def assert_resumed_to_the_end(runs: Path) -> None:
    cell = runs / UNFINISHED
    assert json.loads((cell / "status.json").read_text())["state"] == "done"
    assert steps_of(cell / "metrics.jsonl") == list(range(1, STEPS + 1))
    assert sorted({row["step"] for row in map(json.loads, (cell / "eval.jsonl").read_text().splitlines())}) == [0, 2, 4]
    assert not (cell / "ckpt").exists()


def rewrite_line(path: Path, index: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[index] = text
    path.write_text("".join(lines))


def ckpt(runs: Path, step: int) -> Path:
    return checkpoints.checkpoint_dir(runs / UNFINISHED, step)


# ---- status.json, config.json, metrics.jsonl, eval.jsonl, checkpoints: `harness run` ----------------

def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, path.stat().st_size // 4)))


# (name, cell, file, corruption, expected outcome): "left" = the finished cell is left as it is and
# reported (exit 1); "resume<k>" = the unfinished cell resumes from the checkpoint at step k and ends
# done; "restart" = it restarts from step 0 (saying why) and ends done; "skip" = the run skips the
# finished cell and finishes the other.
RUN_CASES = [
    ("status-truncated-finished", DONE, "status.json", _truncate_half, "left"),
    ("status-empty-finished", DONE, "status.json", lambda p: p.write_text(""), "left"),
    ("status-not-utf8-finished", DONE, "status.json", lambda p: p.write_bytes(b'{"state": "\xff\xfe"}'), "left"),
    ("status-a-list-finished", DONE, "status.json", lambda p: p.write_text("[1, 2]"), "left"),
    ("status-a-string-finished", DONE, "status.json", lambda p: p.write_text('"done"'), "left"),
    ("status-unknown-state-finished", DONE, "status.json", lambda p: p.write_text('{"state": "finished"}'), "left"),
    ("status-truncated-unfinished", UNFINISHED, "status.json", _truncate_half, "resume3"),
    ("status-wrong-typed-pid-unfinished", UNFINISHED, "status.json",
     lambda p: p.write_text('{"state": "running", "pid": "x"}'), "resume3"),
    ("config-truncated-unfinished", UNFINISHED, "config.json", _truncate_half, "restart"),
    ("config-not-utf8-finished", DONE, "config.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "skip"),
    ("metrics-torn-last-line-unfinished", UNFINISHED, "metrics.jsonl",
     lambda p: p.write_text(p.read_text() + '{"step": 4, "rew'), "resume3"),
    ("metrics-garbage-line-3-unfinished", UNFINISHED, "metrics.jsonl",
     lambda p: rewrite_line(p, 2, "garbage\n"), "resume2"),
    ("metrics-garbage-line-1-unfinished", UNFINISHED, "metrics.jsonl",
     lambda p: rewrite_line(p, 0, "garbage\n"), "restart"),
    ("metrics-shorter-than-checkpoints", UNFINISHED, "metrics.jsonl",
     lambda p: p.write_text(p.read_text().splitlines(keepends=True)[0]), "restart"),
    ("eval-torn-last-line-unfinished", UNFINISHED, "eval.jsonl",
     lambda p: p.write_text(p.read_text() + '{"step": 4, "bench'), "resume3"),
    ("eval-garbage-line-3-unfinished", UNFINISHED, "eval.jsonl", lambda p: rewrite_line(p, 2, "{]\n"), "restart"),
    ("ckpt-newest-truncated", UNFINISHED, "ckpt/step00000003/state.pt", _truncate_half, "resume2"),
    ("ckpt-newest-empty", UNFINISHED, "ckpt/step00000003/state.pt", lambda p: p.write_bytes(b""), "resume2"),
    ("ckpt-newest-random-bytes", UNFINISHED, "ckpt/step00000003/state.pt", _random_bytes, "resume2"),
    ("ckpt-newest-manifest-garbage", UNFINISHED, "ckpt/step00000003/manifest.json",
     lambda p: p.write_text("{not json"), "resume2"),
    ("ckpt-newest-manifest-missing", UNFINISHED, "ckpt/step00000003/manifest.json", lambda p: p.unlink(), "resume2"),
    ("ckpt-both-random-bytes", UNFINISHED, "ckpt", lambda p: [_random_bytes(s) for s in p.glob("*/state.pt")],
     "restart"),
]


@pytest.mark.parametrize("name, cell, file, corrupt, outcome", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_recovers_or_leaves_finished_data(name, cell, file, corrupt, outcome, template, runs, cache_dir, capsys):
    corrupt(runs / cell / file)
    before = snapshot(runs / DONE)
    code, out, err = invoke(capsys, run_args(runs, cache_dir))
    if outcome == "left":
        assert code == 1
        assert f"cell {DONE}: " in out and "its metrics reach the final step, so it is left as it is" in out
        assert snapshot(runs / DONE) == before, "a finished cell is never discarded"
        assert "1 finished with an unreadable status.json and left as they are" in out
        # `harness status` lists it as corrupt, with the reason, and `harness report` skips it.
        code, out, _ = invoke(capsys, ["status", "--out", str(runs)])
        assert code == 0 and f"{DONE}" in out and "corrupt" in out and "status.json" in out
        code, _, err = invoke(capsys, ["report", "--runs", str(runs), "--format", "csv"])
        assert code == 0 and f"{DONE}: " in err and "status.json" in err
        assert invoke(capsys, ["report", "--runs", str(runs), "--format", "csv", "--strict"])[0] == 1
        return
    assert code == 0, out + err
    assert_finished_cell_kept(template, runs, file if cell == DONE else None)
    assert_resumed_to_the_end(runs)
    if outcome.startswith("resume"):
        assert f"cell {UNFINISHED}: resuming from the checkpoint at step {outcome[6:]} of {STEPS}" in out
        if outcome == "resume2":
            assert f"cell {UNFINISHED}: the checkpoint at step 3 failed verification and is not used: " in out
    elif outcome == "restart":
        assert f"cell {UNFINISHED}: restarting from step 0 (" in out


# ---- checkpoints that would run code ---------------------------------------------------------------

class Payload:
    """Unpickling this runs `touch <marker>`: what a crafted state.pt would do with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(runs: Path, marker: Path, with_manifest: bool) -> Path:
    folder = ckpt(runs, 3)
    torch.save({"step": 3, "policy": Payload(marker)}, folder / "state.pt")
    manifest = folder / "manifest.json"
    if with_manifest:  # a crafted manifest whose checksums match the crafted state
        data = json.loads(manifest.read_text())
        data["state"].update(bytes=(folder / "state.pt").stat().st_size, sha256=checkpoints.sha256_of(folder / "state.pt"))
        manifest.write_text(json.dumps(data))
    else:
        manifest.unlink()
    return folder


def test_crafted_checkpoint_with_matching_checksums_is_refused_and_runs_nothing(runs, cache_dir, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    folder = plant_payload(runs, marker, with_manifest=True)
    with pytest.raises(pickle.UnpicklingError):  # the payload is real: weights_only=False would run it
        torch.load(folder / "state.pt", weights_only=True)
    code, out, err = invoke(capsys, run_args(runs, cache_dir))
    assert code == 2
    assert f"harness: error: {str(folder / 'state.pt')!r}: refused: " in err and "weights_only=True" in err
    assert "nothing in it was run" in err
    assert not marker.exists()
    assert (folder / "state.pt").exists(), "the refused file is left for the user to inspect"


def test_crafted_checkpoint_without_manifest_is_never_loaded(runs, cache_dir, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    plant_payload(runs, marker, with_manifest=False)
    code, out, _ = invoke(capsys, run_args(runs, cache_dir))
    assert code == 0
    assert "the checkpoint at step 3 failed verification and is not used: it has no manifest.json" in out
    assert "resuming from the checkpoint at step 2 of 4" in out
    assert not marker.exists()
    assert_resumed_to_the_end(runs)


def test_checkpoint_state_is_tensors_and_plain_data(template):
    state = torch.load(ckpt(template, 3) / "state.pt", weights_only=True)
    rng = state["rng"]
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"]["keys"].shape == (624,)
    assert rng["python"]["internal"].shape == (625,)
    manifest = json.loads((ckpt(template, 3) / "manifest.json").read_text())
    assert manifest["state"]["sha256"] == checkpoints.sha256_of(ckpt(template, 3) / "state.pt")
    metrics = template / UNFINISHED / "metrics.jsonl"
    assert manifest["files"]["metrics.jsonl"]["bytes"] == metrics.stat().st_size  # 3 lines: steps 1-3
    assert manifest["files"]["metrics.jsonl"]["sha256"] == checkpoints.sha256_of(metrics)


def test_rng_state_round_trips():
    import random

    import numpy as np

    from harness.seeding import rng_state, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached Gaussian in numpy's state
    saved = rng_state()
    expected = (torch.rand(2), np.random.normal(size=2), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(saved)
    got = (torch.rand(2), np.random.normal(size=2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ---- grid.json and the lock -------------------------------------------------------------------------

GRID_CASES = [
    ("grid-garbage", b"{cells", "malformed JSON (line 1"),
    ("grid-not-utf8", b'{"cells": ["\xff"]}', "not UTF-8 text"),
    ("grid-a-list", b"[1, 2]", "expected an object, found a list"),
    ("grid-wrong-typed-cell", b'{"cells": [{"path": 3, "label": "x", "steps": 4}]}', "cell 0 must be an object"),
    ("grid-cells-not-a-list", b'{"cells": 3}', '"cells" must be a list'),
]


@pytest.mark.parametrize("name, content, message", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_unreadable_grid_json_is_one_line_for_run_and_status(name, content, message, runs, cache_dir, capsys):
    (runs / "grid.json").write_bytes(content)
    before = snapshot(runs)
    for args in (run_args(runs, cache_dir), ["status", "--out", str(runs)]):
        code, _, err = invoke(capsys, args)
        assert code == 2 and f"{str(runs / 'grid.json')!r}: {message}" in err
    assert snapshot(runs) == before, "nothing written"
    assert invoke(capsys, ["report", "--runs", str(runs), "--format", "csv"])[0] == 0  # the report needs no grid.json


def test_lock_that_is_a_directory_is_one_line(runs, cache_dir, capsys):
    (runs / store.LOCK_NAME).unlink()
    (runs / store.LOCK_NAME).mkdir()
    code, _, err = invoke(capsys, run_args(runs, cache_dir))
    assert code == 2 and "the run lock must be a plain file" in err
    assert invoke(capsys, ["status", "--out", str(runs)])[0] == 0


def test_lock_with_garbage_contents_is_taken_over(runs, cache_dir, capsys):
    (runs / store.LOCK_NAME).write_bytes(b"\xff garbage\n")
    code, out, _ = invoke(capsys, run_args(runs, cache_dir))
    assert code == 0
    assert_resumed_to_the_end(runs)


# ---- `harness report` on corrupt finished cells ----------------------------------------------------

REPORT_CASES = [
    ("metrics-not-utf8", "metrics.jsonl", lambda p: p.write_bytes(p.read_bytes() + b"\xff\n"), "not UTF-8 text"),
    ("metrics-garbage-line-2", "metrics.jsonl", lambda p: rewrite_line(p, 1, "garbage\n"), "line 2: malformed JSON"),
    ("eval-lacks-a-key", "eval.jsonl", lambda p: rewrite_line(p, 0, '{"step": 0}\n'), "line 1: lacks the key(s)"),
    ("eval-not-utf8", "eval.jsonl", lambda p: p.write_bytes(b"\xff" + p.read_bytes()), "not UTF-8 text"),
    ("eval-a-list-line", "eval.jsonl", lambda p: rewrite_line(p, 1, "[1]\n"), "line 2: expected an object"),
]


@pytest.mark.parametrize("name, file, corrupt, message", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_skips_a_corrupt_cell_and_lists_it(name, file, corrupt, message, template, runs, cache_dir, capsys):
    corrupt(runs / DONE / file)
    code, out, err = invoke(capsys, ["report", "--runs", str(runs), "--format", "md,csv"])
    assert code == 0
    assert f"harness: warning: 1 cell(s) skipped, their files are corrupt: {DONE}: " in err and message in err
    report = (runs / "report" / "report.md").read_text()
    assert "grpo/none/seed0 (corrupt, skipped: " in report and message in report
    cells = (runs / "report" / "csv" / "cells.csv").read_text()
    assert "corrupt" in cells and message in cells
    code, _, err = invoke(capsys, ["report", "--runs", str(runs), "--format", "md", "--strict"])
    assert code == 1 and err.startswith("harness: error: --strict: 1 cell(s) skipped")
    # `harness run` leaves the finished cell as it is (its status says done).
    assert invoke(capsys, run_args(runs, cache_dir))[0] == 0
    assert_finished_cell_kept(template, runs, file)


def test_report_recovers_from_a_crash_between_its_renames(runs, capsys):
    assert invoke(capsys, ["report", "--runs", str(runs), "--format", "md"])[0] == 0
    # Died after moving the old report aside and before moving the new one in.
    os.replace(runs / "report", runs / ".report.old-abc")
    (runs / ".report.tmp-def").mkdir()
    os.utime(runs / ".report.tmp-def", (0, 0))
    assert invoke(capsys, ["report", "--runs", str(runs), "--format", "csv"])[0] == 0
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith((".report", "report"))) == ["report"]
    assert sorted(p.name for p in (runs / "report").iterdir()) == [".harness-report", "csv"]


# ---- the user's own files ----------------------------------------------------------------------------

def test_out_folder_of_the_users_is_refused_and_left_untouched(tmp_path, cache_dir, capsys, monkeypatch):
    mine = tmp_path / "mine"
    (mine / DONE).mkdir(parents=True)
    (mine / DONE / "notes.txt").write_text("my notes")
    (mine / "grid.json").write_text("my grid")
    (mine / store.LOCK_NAME).write_text("my lock")
    before = snapshot(mine)
    monkeypatch.chdir(mine)
    code, _, err = invoke(capsys, run_args(Path("."), cache_dir))
    assert code == 2 and "is a non-empty folder that is not a harness run store (no .harness-store)" in err
    assert snapshot(mine) == before


def test_store_written_by_a_run_carries_the_marker(template):
    assert (template / store.MARKER_NAME).is_file()


@pytest.mark.parametrize("where", ["a-file", "inside-a-file"])
def test_out_that_is_or_is_inside_a_file_is_one_line(where, tmp_path, cache_dir, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "a-file" else tmp_path / "f" / "runs"
    code, _, err = invoke(capsys, run_args(out, cache_dir))
    assert code == 2 and "is a file, not a folder" in err
    assert (tmp_path / "f").read_text() == "x"


# ---- full disk and read-only, on a small tmpfs (mounting needs root, as in CI) ----------------------

@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a tmpfs is needed to fill a disk, and mount is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_store_usable(tmp_path, cache_dir, capsys, template):
    state_size = (ckpt(template, 3) / "state.pt").stat().st_size
    with tmpfs(tmp_path / "disk", f"size={int(state_size * 2.5)}") as disk:
        out = disk / "runs"
        code, out_text, err = invoke(capsys, run_args(out, cache_dir, "--seeds", "1"))
        assert code == 2, out_text + err
        assert "cannot write the run store: " in err and "No space left on device" in err and str(out) in err
        cell = out / DONE
        assert not list((cell / "ckpt").glob(".*.tmp")), "the half-written checkpoint is removed"
        assert all(p.name.startswith("step") for p in (cell / "ckpt").iterdir())
        checkpoints.verify_checkpoint(cell, checkpoints.latest_checkpoint(cell)[1])  # the last complete one is intact
        code, status_out, _ = invoke(capsys, ["status", "--out", str(out)])
        assert code == 0 and "pending" in status_out
        # Once there is room, the same command resumes the cell from that checkpoint and finishes it.
        subprocess.run(["mount", "-o", f"remount,size={state_size * 8}", str(disk)], check=True)
        code, out_text, _ = invoke(capsys, run_args(out, cache_dir, "--seeds", "1"))
        assert code == 0 and f"cell {DONE}: resuming from the checkpoint at step" in out_text
        assert steps_of(cell / "metrics.jsonl") == list(range(1, STEPS + 1))


def test_full_disk_during_a_report_is_one_line_and_leaves_no_temporary_folder(runs, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        code, _, err = invoke(capsys, ["report", "--runs", str(runs), "--out", str(disk / "report")])
        assert code == 2 and "No space left on device" in err
        assert list(disk.iterdir()) == []


def test_read_only_out_is_one_line(tmp_path, cache_dir, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        code, _, err = invoke(capsys, run_args(ro / "runs", cache_dir))
        assert code == 2 and "is not writable" in err


def test_an_interrupt_while_a_checkpoint_is_written_is_a_keyboard_interrupt_not_a_failure(tmp_path, monkeypatch):
    """A SIGINT / SIGTERM handler raises KeyboardInterrupt wherever the main thread is; inside torch.save's
    write, torch's zip writer would turn it into a RuntimeError and the cell would end failed, not
    interrupted (seen once in the grid's signal test)."""
    real_write, calls = os.write, []

    def interrupted_write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(fd, data)

    monkeypatch.setattr(checkpoints.os, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_tensors({"w": torch.zeros(1000)}, tmp_path / "state.pt")
    assert len(calls) == 2
