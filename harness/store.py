"""The run store: one folder per cell, small files written atomically.

    <out>/<suite>/<algo>/<noise>/seed<k>/
        config.json     the fully resolved configuration
        metrics.jsonl   one object per training step (key "step")
        eval.jsonl      one object per (eval point, benchmark, metric)
        status.json     {"state": "running" | "done" | "failed" | "interrupted", "reason": ..., ...}
        ckpt/step<k>/   the last checkpoint of an unfinished cell (removed when the cell is done)
    <out>/grid.json             the cells every `harness run` on this folder asked for
    <out>/.harness-run.lock     held (flock) by the `harness run` using this folder; holds its pid
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.errors import HarnessError


def cell_dir(out: Path, suite: str, algo: str, noise: str, seed: int) -> Path:
    return Path(out) / suite / algo / noise / f"seed{seed}"


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append whole lines and flush them to disk: a crash loses at most the line being written."""
    text = "".join(json.dumps(_clean(row), sort_keys=True) + "\n" for row in rows)
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_status(cell: Path) -> dict | None:
    path = Path(cell) / "status.json"
    if not path.exists():
        return None
    try:
        return read_json(path)
    except json.JSONDecodeError:
        return None


def write_status(cell: Path, state: str, **extra: Any) -> None:
    atomic_write_json(Path(cell) / "status.json", {"state": state, "time": time.time(), **extra})


def reset_cell(cell: Path) -> None:
    """Start a cell afresh: an unfinished cell's partial files would otherwise mix two runs."""
    cell = Path(cell)
    if cell.exists():
        shutil.rmtree(cell)
    cell.mkdir(parents=True)


# ---- checkpoints ---------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it becomes `final` in one `os.replace`,
    so a reader (or a resume after `kill -9`) sees either the whole folder or none of it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def checkpoint_dir(cell: Path, step: int) -> Path:
    return Path(cell) / "ckpt" / f"step{step:08d}"


def latest_checkpoint(cell: Path) -> tuple[int, Path] | None:
    """`(step, folder)` of the newest complete checkpoint of a cell, or None."""
    found = []
    for path in (Path(cell) / "ckpt").glob("step*"):
        if path.is_dir() and path.name[4:].isdigit() and (path / "state.pt").exists():
            found.append((int(path.name[4:]), path))
    return max(found) if found else None


def prune_checkpoints(cell: Path, keep: Path | None = None) -> None:
    """Remove every checkpoint of a cell except `keep` (all of them when `keep` is None)."""
    root = Path(cell) / "ckpt"
    if not root.exists():
        return
    for path in root.iterdir():
        if path != keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if keep is None:
        root.rmdir()


def file_size(path: Path) -> int:
    return Path(path).stat().st_size if Path(path).exists() else 0


def truncate(path: Path, size: int) -> None:
    """Cut a JSONL file back to `size` bytes: lines written after a checkpoint are dropped on resume."""
    path = Path(path)
    if size == 0 and not path.exists():
        return
    if file_size(path) < size:
        raise RuntimeError(f"{path} is shorter ({file_size(path)} bytes) than its checkpoint recorded ({size})")
    with open(path, "r+b") as fh:
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())


def last_step(cell: Path) -> int:
    """The step of the last complete line of a cell's metrics.jsonl (0 when none)."""
    path = Path(cell) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_bytes().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


# ---- the run lock --------------------------------------------------------------------------------

LOCK_NAME = ".harness-run.lock"


def _read_pid(path: Path) -> int | None:
    try:
        text = Path(path).read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive `flock` on `<out>/.harness-run.lock`, which also records the holder's pid.

    The kernel drops a flock when its holder dies (crash, `kill -9`, reboot), so a lock file left
    by a dead run is stale by construction: the next run takes it over and says so."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_pid(self.path)
            raise HarnessError(f"another harness run (pid {holder}) is using {str(self.path.parent)!r}; "
                               "wait for it to finish or stop it") from None
        previous = _read_pid(self.path)
        self.stale_pid = previous if previous is not None and previous != os.getpid() else None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly, nothing stale to report
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(out: Path) -> int | None:
    """The pid of the live `harness run` holding `out`'s lock, or None."""
    path = Path(out) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(path) or -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
