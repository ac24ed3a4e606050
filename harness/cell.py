"""One cell's life in the process that runs it: the `Cell` record (its configuration, folder and
place in a multi-node launch), `begin_cell` (resume or start afresh, status `running`), training it
in this process (`train_cell`) and the status records of how it ended (done, failed, interrupted).
`harness.launch` runs a cell of several ranks; `harness.grid` schedules many cells.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harness import checkpoints, store
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.export import save_model
from harness.tracking import Tracker


@dataclass(frozen=True)
class NodeLaunch:
    """This process's place in a plain multi-node torchrun (`train.nnodes` > 1): every node runs the
    same `harness run` over a run store on a shared filesystem, with its own `rank`. Node 0, the
    leader, hosts the rendezvous at `endpoint` (HOST:PORT, reachable from every node), locks the
    store and writes every status; each cell is one rendezvous, named `run_id` and the cell."""
    rank: int = 0
    endpoint: str = ""
    run_id: str = "harness"

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass
class Cell:
    cfg: RunConfig
    path: Path
    log_to: tuple[str, ...] = ()  # tracking backends (harness.tracking)
    grid: str = ""  # the tracked runs' group
    save_model: str = "none"  # harness.export.MODES
    node: NodeLaunch = NodeLaunch()  # this process's node in a multi-node torchrun (train.nnodes > 1)

    @property
    def label(self) -> str:
        return f"{self.cfg.suite}/{self.cfg.algo}/{self.cfg.noise}/seed{self.cfg.seed}"


def say(message: str) -> None:
    """A progress line that survives progress bars, worker processes and Ray's log forwarding."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def config_change(cell: Cell) -> str | None:
    """Why the cell's config.json does not hold this configuration (None when it does)."""
    try:
        written = store.read_json(cell.path / "config.json")
    except store.StoreError as exc:
        return f"its config.json is unusable: {str(exc).split(': ', 1)[-1]}"
    return None if written == json.loads(json.dumps(store._clean(cell.cfg.to_dict()))) else "its configuration changed"


def same_config(cell: Cell) -> bool:
    return config_change(cell) is None


# errno values that mean a file cannot be written: a full disk or a read-only one anywhere, a
# permission refused inside the run store. No cell can run then: the grid stops with one line.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
PERMISSION_ERRORS = {errno.EACCES, errno.EPERM}


def write_error(cell: Cell, exc: OSError) -> str | None:
    """The one-line reason when `exc` means the cell's files cannot be written, else None."""
    inside = exc.filename is not None and Path(str(exc.filename)).resolve().is_relative_to(cell.path.resolve().parents[3])
    if exc.errno in DISK_ERRORS or (exc.errno in PERMISSION_ERRORS and inside):
        return f"cannot write {'the run store' if inside else 'a file'}: {store.os_error_message(exc)}"
    return None


def begin_cell(cell: Cell) -> tuple[dict[str, Any], tuple[int, Path] | None]:
    """Before a cell trains: keep its files when it resumes (unchanged configuration and a
    checkpoint that passes verification), else start it afresh; say which; write status `running`.
    Returns the status fields and the checkpoint `(step, folder)` to resume from (None: step 0)."""
    try:
        previous = store.read_status(cell.path) or {}
    except store.StoreError:  # run_grid runs such a cell only when it did not finish
        previous = {}
    change = config_change(cell) if cell.path.exists() else "it has no files yet"
    rejected: list[int] = []

    def reject(step: int, why: str) -> None:
        rejected.append(step)
        say(f"cell {cell.label}: the checkpoint at step {step} failed verification and is not used: {why}")

    found = checkpoints.usable_checkpoint(cell.path, on_reject=reject) if change is None else None
    if found is None:
        reached = store.last_step(cell.path)
        if reached > 0 or rejected:
            why = change or ("no checkpoint passed verification" if rejected else "it has no checkpoint")
            say(f"cell {cell.label}: restarting from step 0 ({why}; it had reached step {reached})")
        store.reset_cell(cell.path)
        store.atomic_write_json(cell.path / "config.json", cell.cfg.to_dict())
    resumed_from = found[0] if found else 0
    steps = cell.cfg.train.steps
    if resumed_from:
        left = steps - resumed_from
        older = " (the newest that passed verification)" if rejected else ""
        say(f"cell {cell.label}: resuming from the checkpoint at step {resumed_from} of {steps}{older} "
            f"({left} step{'s' if left != 1 else ''} left{'; only the final status is written' if left == 0 else ''})")
    attempt = previous.get("attempt", 0) + 1 if found else 1  # read_status checked it is an integer
    info = {"resumed_from": resumed_from, "attempt": attempt, "steps": steps, "pid": os.getpid(),
            "host": socket.gethostname()}
    store.write_status(cell.path, "running", **info)
    return info, found


def train_cell(cell: Cell, cache_dir: Path | None, ckpt_every: int, progress: bool) -> dict[str, Any]:
    """Train a one-process cell to the end (resuming where `begin_cell` found a checkpoint), export
    its model if asked, and write its final status; see `harness.launch.run_cell`."""
    from harness.trainer import Trainer

    info, found = begin_cell(cell)
    resumed_from = info["resumed_from"]
    trainer = tracker = None
    try:
        trainer = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=progress)
        trainer.tracker = tracker = Tracker(cell.log_to, cell.path, cell.label, cell.grid, cell.cfg.to_dict(), resumed_from)
        summary = trainer.run(ckpt_every=ckpt_every, resume=found[1] if found else None)
        if cell.save_model != "none":
            save_model(trainer, cell.path / "model", with_critic=cell.save_model == "final+critic")
    except KeyboardInterrupt:
        step = trainer.step if trainer else resumed_from
        store.write_status(cell.path, "interrupted", step=step, reason="interrupted", **info)
        close_tracker(tracker, "interrupted")
        raise
    except HarnessError as exc:
        step = trainer.step if trainer else resumed_from
        store.write_status(cell.path, "failed", step=step, reason=str(exc), fatal=True, **info)
        close_tracker(tracker, "failed")
        return store.read_status(cell.path)
    except OSError as exc:
        close_tracker(tracker, "failed")
        if write_error(cell, exc) is not None:
            raise
        return _failed(cell, trainer, resumed_from, exc, info)
    except Exception as exc:  # noqa: BLE001 - a failing cell must not stop the grid
        close_tracker(tracker, "failed")
        return _failed(cell, trainer, resumed_from, exc, info)
    close_tracker(tracker, "done")
    store.write_status(cell.path, "done", **summary, **info)
    checkpoints.prune_checkpoints(cell.path)
    return store.read_status(cell.path)


def _failed(cell: Cell, trainer, resumed_from: int, exc: BaseException, info: dict[str, Any]) -> dict[str, Any]:
    step = trainer.step if trainer else resumed_from
    reason = f"{type(exc).__name__}: {exc}"
    if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
        reason = f"out of memory: {reason}"
    store.write_status(cell.path, "failed", step=step, reason=reason, traceback=traceback.format_exc(), **info)
    return store.read_status(cell.path)


def close_tracker(tracker: Tracker | None, state: str) -> None:
    """Close a cell's tracked runs; a tracking backend that fails to close does not change the cell's state."""
    if tracker is None:
        return
    try:
        tracker.close(state)
    except Exception as exc:  # noqa: BLE001
        say(f"tracking: closing the tracked runs failed: {type(exc).__name__}: {exc}")


def read_status_or_none(cell: Cell) -> dict[str, Any]:
    try:
        return store.read_status(cell.path) or {}
    except store.StoreError:
        return {}

