"""Grid execution: checkpoints and exact resume after `kill -9`, the run lock, contained failures,
`--workers` and the Ray backend giving the same metrics as a serial run, `harness status`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from algorithms import ALGOS
from algorithms.grpo import GRPO
from harness import checkpoints, store
from harness.cli import main
from harness.trainer import Trainer
from tests.conftest import fast_args, kill_9_when_stalled

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("arith/grpo/none/seed0", "arith/ppo/none/seed0")


def grid_args(out: Path, cache_dir: Path, steps: int = 6, algos: str = "ppo,grpo", *extra: str) -> list[str]:
    return ["run", "--algos", algos, "--noise", "none", "--seeds", "1", "--steps", str(steps), "--out", str(out),
            "--cache-dir", str(cache_dir), "--quiet", "--workers", "1", *fast_args(), *extra]  # serial unless extra says


def strip_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in rows]


def results(out: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    return {cell: (strip_timing(out / cell / "metrics.jsonl"), strip_timing(out / cell / "eval.jsonl")) for cell in CELLS}


def squeeze(text: str) -> list[str]:
    """Lines with runs of spaces made one (the status table pads its columns)."""
    return [" ".join(line.split()) for line in text.splitlines()]


def status(out: Path, cell: str) -> dict:
    return json.loads((out / cell / "status.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The reference: the two-cell grid (6 steps, checkpoints every 3) run straight through."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(grid_args(out, cache_dir, 6, "ppo,grpo", "--ckpt-every", "3")) == 0
    for cell in CELLS:
        assert status(out, cell)["state"] == "done"
        assert not (out / cell / "ckpt").exists(), "a finished cell keeps no checkpoint"
    return results(out)


# The run that gets killed: `python -m harness.cli run ...`, with one patch that holds the first
# cell still at the start of step 6 (after its checkpoint at step 3 and the lines of steps 4 and 5,
# and the evaluation at step 4, which the resume must cut off), so that the kill lands mid-cell
# on any machine speed.
KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from harness.trainer import Trainer
    from harness.cli import main
    marker = Path(sys.argv[1])
    step = Trainer.train_step
    def stall(self, n):
        if n == 6 and self.cfg.algo == "grpo":
            marker.write_text("stalled")
            time.sleep(120)
        return step(self, n)
    Trainer.train_step = stall
    sys.exit(main(sys.argv[2:]))
""")


def test_kill_9_mid_cell_then_rerun_resumes_exactly(tmp_path, cache_dir, uninterrupted, monkeypatch, capsys):
    out = tmp_path / "runs"
    args = grid_args(out, cache_dir, 6, "ppo,grpo", "--ckpt-every", "3")
    kill_9_when_stalled(KILLED_RUN, tmp_path / "stalled", args, 120, "the run")  # stalls at step 6
    grpo = out / CELLS[0]
    assert checkpoints.latest_checkpoint(grpo)[0] == 3
    assert [json.loads(line)["step"] for line in (grpo / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert status(out, CELLS[0])["state"] == "running"
    assert status(out, CELLS[1])["state"] == "done"  # ppo runs first
    ppo_before = (out / CELLS[1] / "metrics.jsonl").read_text()

    # `harness status` after the crash: the killed cell is pending and resumes from step 3.
    assert main(["status", "--out", str(out)]) == 0
    lines = squeeze(capsys.readouterr().out)
    assert lines[0].endswith("2 cells: 1 done, 0 running, 0 failed, 1 pending")
    assert "arith/grpo/none/seed0 pending 5/6 interrupted at step 5; resumes from the checkpoint at step 3" in lines

    # Re-run the same command, counting the training steps each cell runs.
    ran: dict[str, list[int]] = {}
    train_step = Trainer.train_step

    def counting(self, n):
        ran.setdefault(self.cfg.algo, []).append(n)
        return train_step(self, n)

    monkeypatch.setattr(Trainer, "train_step", counting)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cell arith/grpo/none/seed0: resuming from the checkpoint at step 3 of 6 (3 steps left)" in printed
    assert "grid: 1 done, 1 already done, 0 failed, 1 resumed from a checkpoint" in printed
    assert ran == {"grpo": [4, 5, 6]}, "no step ran twice past a checkpoint; the finished cell is skipped"
    assert status(out, CELLS[0])["resumed_from"] == 3 and status(out, CELLS[0])["attempt"] == 2
    assert (out / CELLS[1] / "metrics.jsonl").read_text() == ppo_before
    assert results(out) == uninterrupted


def test_workers_2_gives_the_serial_metrics(tmp_path, cache_dir, uninterrupted, capsys):
    out = tmp_path / "runs"
    assert main(grid_args(out, cache_dir, 6, "ppo,grpo", "--workers", "2", "--ckpt-every", "3")) == 0
    assert "grid: 2 done" in capsys.readouterr().out
    assert results(out) == uninterrupted
    pids = {status(out, cell)["pid"] for cell in CELLS}
    assert len(pids) == 2 and os.getpid() not in pids, "each cell ran in its own worker process"


def test_ray_backend_gives_the_serial_metrics(tmp_path, cache_dir, uninterrupted, capsys):
    # One cell (starting Ray and a worker costs most of this test), as a task of a local instance.
    pytest.importorskip("ray")
    out = tmp_path / "runs"
    assert main(grid_args(out, cache_dir, 6, "grpo", "--backend", "ray", "--ckpt-every", "3")) == 0
    assert "grid: 1 done" in capsys.readouterr().out
    cell = CELLS[0]
    assert (strip_timing(out / cell / "metrics.jsonl"), strip_timing(out / cell / "eval.jsonl")) == uninterrupted[cell]
    assert status(out, cell)["pid"] != os.getpid()


def test_resume_into_zero_steps_is_stated(tmp_path, cache_dir, monkeypatch, capsys):
    # A crash between the final checkpoint and the "done" status: the re-run has no step left to
    # run; it says so, and the metrics stay as they were.
    out = tmp_path / "runs"
    args = grid_args(out, cache_dir, 2, "grpo", "--ckpt-every", "2")
    monkeypatch.setattr(checkpoints, "prune_checkpoints", lambda cell, keep=None: None)
    assert main(args) == 0
    cell = out / CELLS[0]
    before = (cell / "metrics.jsonl").read_text()
    store.write_status(cell, "running", pid=999999999)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming from the checkpoint at step 2 of 2 (0 steps left; only the final status is written)" in \
        capsys.readouterr().out
    assert status(out, CELLS[0])["state"] == "done" and status(out, CELLS[0])["resumed_from"] == 2
    assert (cell / "metrics.jsonl").read_text() == before


def test_checkpoint_holds_every_state_and_restores_it(tmp_path, cache_dir):
    from harness.resolver import build_cells
    from tests.conftest import FAST

    cell = build_cells("arith", ["ppo"], "none", [0], tmp_path, steps=2, overrides=FAST)[0]
    cell.path.mkdir(parents=True)
    a = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)
    a.run(ckpt_every=2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a.save_checkpoint(2, {"ID_accuracy": 0.5})
    state = torch.load(checkpoints.checkpoint_dir(cell.path, 2) / "state.pt", weights_only=True)  # tensors and plain data
    assert {"policy", "heads", "critic", "actor_opt", "critic_opt", "rng", "step", "summary"} <= set(state)
    manifest = json.loads((checkpoints.checkpoint_dir(cell.path, 2) / "manifest.json").read_text())
    assert set(manifest["files"]) == {"metrics.jsonl", "eval.jsonl"}
    assert manifest["files"]["metrics.jsonl"]["bytes"] == (cell.path / "metrics.jsonl").stat().st_size
    assert [p.name for p in (cell.path / "ckpt").iterdir()] == ["step00000002"]

    b = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)
    assert b.restore_latest() == 2
    assert torch.equal(torch.rand(3), expected), "the global torch RNG is restored"
    for (name, p), q in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(a.critic.state_dict().items(), b.critic.state_dict().values()):
        assert torch.equal(p, q), name
    # two train steps of two minibatches each: four optimiser steps
    assert b.actor_opt.state_dict()["state"][0]["step"] == a.actor_opt.state_dict()["state"][0]["step"] == 4


HOLD_LOCK = ("import sys, time; from harness.store import RunLock, claim_store; claim_store(sys.argv[1]); "
             "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")


def test_second_run_on_the_same_out_refuses_naming_the_holder(tmp_path, cache_dir, capsys):
    out = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        assert main(grid_args(out, cache_dir, 1, "ppo")) == 2
        err = capsys.readouterr().err
        assert err == f"harness: error: another harness run (pid {holder.pid}) is using {str(out)!r}; " \
                      "wait for it to finish or stop it\n"
        assert not (out / "arith").exists()
        assert store.lock_holder(out) == holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, cache_dir, capsys):
    out = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    holder.kill()  # SIGKILL: the lock file still names it
    holder.wait()
    holder.stdout.close()
    assert (out / store.LOCK_NAME).read_text().split()[0] == str(holder.pid)
    assert store.lock_holder(out) is None
    assert main(grid_args(out, cache_dir, 1, "ppo")) == 0
    printed = capsys.readouterr().out
    assert f"took over the lock of {str(out)!r} left by pid {holder.pid}, which is no longer running" in printed
    assert (out / store.LOCK_NAME).read_text() == "", "released cleanly at the end"


class NaNGRPO(GRPO):
    """GRPO whose actor loss is NaN from the first step (test only)."""

    name = "nangrpo"

    def actor_loss(self, mb, fwd, heads):
        loss, metrics = super().actor_loss(mb, fwd, heads)
        return loss * float("nan"), metrics


@pytest.fixture
def nan_algo():
    ALGOS.add("nangrpo", NaNGRPO)
    yield "nangrpo"
    del ALGOS._items["nangrpo"]


def test_non_finite_loss_fails_its_cell_and_the_grid_goes_on(tmp_path, cache_dir, nan_algo, capsys):
    out = tmp_path / "runs"
    args = grid_args(out, cache_dir, 2, f"{nan_algo},ppo")
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "cell arith/nangrpo/none/seed0 failed at step 1: NonFiniteLoss: non-finite actor loss (nan) at step 1" in printed
    assert "grid: 1 done, 0 already done, 1 failed -> " in printed
    failed = status(out, "arith/nangrpo/none/seed0")
    assert failed["state"] == "failed" and failed["step"] == 1 and "NonFiniteLoss" in failed["reason"]
    assert status(out, "arith/ppo/none/seed0")["state"] == "done"

    # Without --retry-failed the failed cell is left as it is, and the summary says so.
    assert main(args) == 1
    assert "grid: 0 done, 1 already done, 0 failed, 1 failed earlier and left as they are " \
           "(--retry-failed re-runs them)" in capsys.readouterr().out
    assert status(out, "arith/nangrpo/none/seed0")["time"] == failed["time"]
    assert main(["status", "--out", str(out)]) == 0
    lines = squeeze(capsys.readouterr().out)
    assert "arith/nangrpo/none/seed0 failed 1/2 NonFiniteLoss: non-finite actor loss (nan) at step 1" in lines
    assert any(line.startswith("arith/ppo/none/seed0 done 2/2 ID_accuracy") for line in lines)

    # --retry-failed runs it again (and it fails again, at the same step).
    assert main([*args, "--retry-failed"]) == 1
    assert "grid: 0 done, 1 already done, 1 failed -> " in capsys.readouterr().out
    assert status(out, "arith/nangrpo/none/seed0")["time"] > failed["time"]


def test_bad_execution_options_are_one_line_errors(tmp_path, cache_dir, capsys):
    for extra, message in ((["--workers", "0"], "--workers must be a positive integer"),
                           (["--ckpt-every", "-1"], "--ckpt-every must be >= 0"),
                           (["--backend", "slurm"], "invalid choice: 'slurm'")):
        assert main(grid_args(tmp_path / "runs", cache_dir, 1, "ppo", *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("harness: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()
    assert main(["status", "--out", str(tmp_path / "nope")]) == 2
    assert "no run store at" in capsys.readouterr().err


def test_default_workers_one_per_core_only_for_tiny_cpu_cells(tmp_path, monkeypatch):
    from harness.grid import default_workers
    from harness.resolver import build_cells

    monkeypatch.setattr("harness.grid.os.cpu_count", lambda: 2)
    cells = build_cells("arith", ["ppo", "grpo"], "none", [0, 1], tmp_path, steps=1)
    assert default_workers(cells) == 2
    assert default_workers(cells[:1]) == 1  # never more workers than cells
    real = build_cells("arith", ["ppo"], "none", [0, 1], tmp_path, steps=1, model="some/real-model")
    assert default_workers(real) == 1
    gpu = build_cells("arith", ["ppo"], "none", [0, 1], tmp_path, steps=1, overrides={"train.device": "cuda"})
    assert default_workers(gpu) == 1


def test_a_killed_worker_fails_only_its_cell_and_leaves_nothing_for_the_resource_tracker(tmp_path, cache_dir):
    """The out-of-memory killer's SIGKILL of one worker: its cell fails with one line naming the signal, the
    other cell finishes, and no multiprocessing resource of the dead worker is left for the resource tracker
    to warn about after the grid's last line (tqdm's default lock is such a named semaphore)."""
    out = tmp_path / "runs"
    args = [*grid_args(out, cache_dir, 40, "ppo,grpo", "--ckpt-every", "2"), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = CELLS[1]
    deadline = time.time() + 180
    while not checkpoints.latest_checkpoint(out / victim):
        assert proc.poll() is None and time.time() < deadline, "the cell never reached a checkpoint"
        time.sleep(0.05)
    os.kill(status(out, victim)["pid"], signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = stdout.decode() + stderr.decode()
    assert proc.returncode != 0, text
    assert status(out, victim)["state"] == "failed" and "killed by signal 9" in status(out, victim)["reason"]
    assert status(out, CELLS[0])["state"] == "done"
    assert "resource_tracker" not in text and "leaked" not in text and "Traceback" not in text, text
    assert [line for line in stderr.decode().splitlines() if line.strip()] == [], stderr.decode()


# ---- interrupts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, to_group, workers", [
    (signal.SIGINT, False, "2"),  # `kill -INT <pid>` of the run alone: its workers get nothing from the shell
    (signal.SIGTERM, True, "2"),  # `kill -TERM -<pgid>`: the run and its workers all get it
    (signal.SIGINT, False, "1"),  # a serial run, the cell in the run's own process
])
def test_sigint_or_sigterm_ends_the_run_in_seconds_with_one_line_cells_interrupted(sig, to_group, workers, tmp_path,
                                                                                  cache_dir, capsys):
    out = tmp_path / "runs"
    args = [*grid_args(out, cache_dir, 400, "ppo,grpo", "--ckpt-every", "2"), "--workers", workers]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    running = CELLS if workers == "2" else CELLS[1:]  # serially ppo runs first
    deadline = time.time() + 180
    while not all(checkpoints.latest_checkpoint(out / cell) for cell in running):  # mid-cell, past a checkpoint
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the cells never reached a checkpoint"
        time.sleep(0.1)
    sent = time.time()
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    took = time.time() - sent
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 130 and took < 15, (code, took, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("harness: interrupted: cells that were running are marked interrupted")
    for cell in running:
        assert status(out, cell)["state"] == "interrupted", status(out, cell)
    assert main(["status", "--out", str(out)]) == 0
    lines = squeeze(capsys.readouterr().out)
    for cell in running:
        step = checkpoints.latest_checkpoint(out / cell)[0]
        assert any(line.startswith(f"{cell} pending") and f"resumes from the checkpoint at step {step}" in line
                   for line in lines), lines
    assert not store.lock_holder(out), "the run lock is released"


def test_workers_whose_cells_want_more_threads_than_cpus_get_a_note(tmp_path, capsys, cache_dir):
    from harness.bootstrap import usable_cpus
    from harness.grid import oversubscription
    from harness.resolver import build_cells

    def cells(threads: int, n: int = 2):
        return build_cells("arith", ["grpo"], "none", list(range(n)), tmp_path, overrides={"train.threads": str(threads)})

    assert oversubscription(cells(1), 2, 2) is None  # tiny cells: one thread each, one per core
    assert oversubscription(cells(2), 1, 2) is None  # one cell at a time
    assert oversubscription(cells(2, n=1), 4, 2) is None  # one cell: the other workers stay idle
    note = oversubscription(cells(2), 2, 2)
    assert note == ("note: 2 workers x 2 torch threads a cell = 4 threads on 2 CPUs; the cells will contend for "
                    "the cores (--set train.threads=1 or fewer --workers)")
    cpus = usable_cpus()  # every CPU a cell, two cells at once: always too many
    args = ["run", "--algos", "grpo", "--noise", "none", "--seeds", "0,1", "--steps", "1", "--out", str(tmp_path / "runs"),
            "--workers", "2", "--cache-dir", str(cache_dir), "--quiet", *fast_args({"train.threads": str(cpus)})]
    assert main(args) == 0
    assert f"harness: note: 2 workers x {cpus} torch threads a cell = {2 * cpus} threads on {cpus} CPUs" \
        in capsys.readouterr().err
