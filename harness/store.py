"""The run store: one folder per cell, small files written atomically.

    <out>/<suite>/<algo>/<noise>/seed<k>/
        config.json     the fully resolved configuration
        metrics.jsonl   one object per training step (key "step")
        eval.jsonl      one object per (eval point, benchmark, metric)
        status.json     {"state": "running" | "done" | "failed" | "interrupted", "reason": ..., ...}
        ckpt/step<k>/   the last checkpoint of an unfinished cell (removed when the cell is done)
    <out>/grid.json             the cells every `harness run` on this folder asked for
    <out>/.harness-run.lock     held (flock) by the `harness run` using this folder; holds its pid
    <out>/.harness-store        the marker: this folder is a run store (the harness deletes and
                                overwrites files only under a folder that carries it)

Every file of the store is read through `read_json` / `read_jsonl`, which turn bad encoding,
malformed JSON, a wrong JSON type or a missing key into `StoreError`: one line naming the file.
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
from harness.jsonl import JsonlError, numbered_objects, type_name


class StoreError(HarnessError):
    """A file of the run store that cannot be used as it is: `<file>: <what is wrong>`."""


def os_error_message(exc: OSError) -> str:
    """`<path>: <what the system said>` for a failed file operation (full disk, read-only, ...)."""
    path = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what += " (the disk is full: free space or give another --out)"
    elif exc.errno == errno.EROFS:
        what += " (give a writable --out)"
    return f"{path}: {what}" if path else what


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside (a write to an open file says only "No space left on device")
    comes out naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


MAX_NAME = 100  # characters of a name that becomes a folder of the store


def check_name(name: str, flag: str) -> str:
    """`name` as one folder name of the store, or a one-line error: non-empty, at most MAX_NAME
    characters, not `.` or `..`, no path separator, no control character."""
    bad = ("is empty" if not name else
           f"is longer than {MAX_NAME} characters" if len(name) > MAX_NAME else
           "is '.' or '..'" if name in (".", "..") else
           "holds a path separator" if "/" in name or "\\" in name or (os.altsep and os.altsep in name) else
           "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
           "starts with '.' (a hidden folder, which status and report do not read)" if name.startswith(".") else None)
    if bad:
        raise HarnessError(f"{flag} must be a non-empty name without '/' or control characters, not '.' or '..', "
                           f"at most {MAX_NAME} characters (one folder name of the run store); {name[:MAX_NAME]!r} {bad}")
    return name


def one_line(message: str, limit: int = 2000) -> str:
    """`message` as one line of at most `limit` characters (a message quoting a huge value is cut)."""
    text = " ".join(str(message).split("\n"))
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 25] + f" ... ({len(text)} characters)"


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


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it back, the fallback,
    would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # the private mask meanwhile: a file another thread creates now is not exposed
    os.umask(umask)
    return umask


def umask_mode(mode: int) -> int:
    """`mode` as the user's umask leaves it (0o666 -> 0o644 under umask 022): what `open` gives a new
    file; `mkstemp` and `mkdtemp` make theirs private (0600, 0700), which a written file must not stay."""
    return mode & ~current_umask()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming(path), os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), umask_mode(0o666))
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
    with naming(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _read_text(path: Path, limit: int | None = None) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit)
    except OSError as exc:
        raise StoreError(f"{str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise StoreError(f"{str(path)!r}: not UTF-8 text (byte {exc.start}, line {line})") from None


def read_json(path: Path, expect: type = dict, keys: Iterable[str] = ()) -> Any:
    """The JSON value of a store file, checked: UTF-8, valid JSON, of type `expect`, holding `keys`
    (when an object). Anything else is a `StoreError` naming the file and what is wrong."""
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "empty" if not text.strip() else f"malformed JSON (line {exc.lineno}: {exc.msg})"
        raise StoreError(f"{str(path)!r}: {what}") from None
    if not isinstance(value, expect):
        raise StoreError(f"{str(path)!r}: expected {type_name(expect())}, found {type_name(value)}")
    missing = [k for k in keys if k not in value] if isinstance(value, dict) else []
    if missing:
        raise StoreError(f"{str(path)!r}: lacks the key(s) {', '.join(missing)}")
    return value


def read_jsonl(path: Path, keys: Iterable[str] = (), upto: int | None = None) -> list[dict]:
    """The objects of a JSONL store file (its first `upto` bytes when given), every line checked:
    UTF-8, a JSON object, holding `keys`; blank lines skipped. A `StoreError` names the true line."""
    text = _read_text(path, upto)
    keys = tuple(keys)
    rows = []
    try:
        for lineno, row in numbered_objects(text.splitlines()):
            missing = [k for k in keys if k not in row]
            if missing:
                raise StoreError(f"{str(path)!r} line {lineno}: lacks the key(s) {', '.join(missing)}")
            rows.append(row)
    except JsonlError as exc:
        raise StoreError(f"{str(path)!r} {exc}") from None
    return rows


STATES = ("running", "done", "failed", "interrupted")
STATUS_TYPES = {"pid": int, "step": int, "steps": int, "attempt": int, "resumed_from": int, "final_step": int,
                "reason": str, "host": str}


def read_status(cell: Path) -> dict | None:
    """A cell's status.json (None when there is none); `StoreError` when it is unreadable."""
    path = Path(cell) / "status.json"
    if not path.exists() and not path.is_symlink():
        return None
    status = read_json(path, dict, ("state",))
    if status["state"] not in STATES:
        raise StoreError(f"{str(path)!r}: unknown state {status['state']!r} (valid: {', '.join(STATES)})")
    for key, kind in STATUS_TYPES.items():
        if key in status and not (isinstance(status[key], kind) and not isinstance(status[key], bool)):
            raise StoreError(f"{str(path)!r}: {key!r} must be {type_name(kind())}, found {type_name(status[key])}")
    return status


def read_grid(out: Path) -> list[dict]:
    """The cells of `<out>/grid.json` ([] when there is none), each `{"path", "label", "steps"}`."""
    path = Path(out) / "grid.json"
    if not path.exists():
        return []
    cells = read_json(path, dict, ("cells",))["cells"]
    if not isinstance(cells, list):
        raise StoreError(f"{str(path)!r}: \"cells\" must be a list, found {type_name(cells)}")
    for i, cell in enumerate(cells):
        ok = (isinstance(cell, dict) and isinstance(cell.get("path"), str) and isinstance(cell.get("label"), str)
              and (cell.get("steps") is None or type(cell.get("steps")) is int))
        if not ok:
            raise StoreError(f"{str(path)!r}: cell {i} must be an object with a string path and label and an "
                             f"integer steps, found {json.dumps(cell)[:80]}")
    return cells


def write_status(cell: Path, state: str, **extra: Any) -> None:
    atomic_write_json(Path(cell) / "status.json", {"state": state, "time": time.time(), **extra})


# ---- the store marker ----------------------------------------------------------------------------

MARKER_NAME = ".harness-store"
MARKER_TEXT = "a harness run store: `harness run` deletes and overwrites files only in folders marked so\n"


def is_store(out: Path) -> bool:
    return (Path(out) / MARKER_NAME).is_file()


def check_out_dir(out: Path) -> None:
    """Refuse an `--out` that cannot be a run store, before anything is written: a file, a path
    through a file, a read-only place, or a non-empty folder that is not a run store."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {str(out)!r} is a file, not a folder; give a folder for the run store")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise HarnessError(f"--out {str(out)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"--out {str(out)!r}: {str(existing)!r} is not writable (read-only or no permission)")
    if out.is_dir() and not is_store(out) and any(out.iterdir()):
        raise HarnessError(
            f"--out {str(out)!r} is a non-empty folder that is not a harness run store (no {MARKER_NAME}); "
            f"give a new or empty folder (a store written by an earlier harness version: create {MARKER_NAME} "
            "in it to adopt it)")


def claim_store(out: Path) -> None:
    """Make `out` a run store (checked by `check_out_dir` first): create it and its marker."""
    check_out_dir(out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not is_store(out):
        atomic_write_text(out / MARKER_NAME, MARKER_TEXT)


def is_evaluation_row(folder: Path) -> bool:
    """A folder `harness eval` wrote: its status.json names the evaluated model, and it holds no
    training files (metrics, checkpoints, a saved model)."""
    try:
        status = read_status(folder)
    except StoreError:
        return False
    return bool(status) and "evaluated_model" in status and not any(
        (Path(folder) / name).exists() for name in ("metrics.jsonl", "ckpt", "model"))


def check_row_folder(out: Path, folder: Path) -> None:
    """The one rule of `harness eval`'s writes inside a store: a new folder, or the folder of an
    earlier evaluation row, which it replaces; never a trained cell, a folder of the user's, or a
    symbolic link out of the store."""
    out, folder = Path(out), Path(folder)
    for path in [out / p for p in list(folder.relative_to(out).parents)[:-1]] + [folder]:
        if path.is_symlink():
            raise HarnessError(f"{str(path)!r} is a symbolic link: harness eval writes only inside the run store")
    if folder.exists() and not is_evaluation_row(folder):
        raise HarnessError(f"{str(folder)!r} exists and is not an evaluation row (a trained cell, or files of "
                           "yours): harness eval never replaces it; give another --name or --out")


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
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp's folder is private; the folder it becomes is not
        for f in tmp.rglob("*"):
            if f.is_dir() and not f.is_symlink():
                os.chmod(f, umask_mode(0o777))
            elif f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fchmod(fh.fileno(), umask_mode(0o666))  # written through temporary files (0600) by some libraries
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise StoreError(f"{str(self.path)!r}: the run lock must be a plain file; this is not one (remove it)")
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
    if not path.is_file():
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
