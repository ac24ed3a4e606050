"""The grid's scheduling: given cells whose configurations `harness.resolver.build_cells` resolved
up front (bad input fails before anything is written), run the cells (serially, in `--workers` processes, or as Ray tasks), skipping those
already done, resuming unfinished ones from their last checkpoint, and containing failures.

A cell's outcome lives in its status.json, written by the process that ran it:

    running      {"pid", "host", "resumed_from", "attempt"}
    done         {"final_step", "<role>_accuracy", "resumed_from", "attempt"}
    failed       {"step", "reason", "traceback"}; left alone unless `--retry-failed`
    interrupted  {"step", "reason"} (SIGINT or SIGTERM, to the run or its process group); resumed by
                 the next run like a crashed cell
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as tqdm_std

from harness import checkpoints, store
from harness.cell import Cell, config_change, read_status_or_none, say
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.launch import run_cell
from harness.signals import InterruptOnce, interrupt_signals
from tasks import SUITES

def default_workers(cells: list["Cell"]) -> int:
    """One worker per core when every cell is a tiny-model CPU cell (single-threaded training, about
    0.5 GiB each); otherwise 1 (a cell of several ranks uses a core per rank), so cells never share a GPU or a large model's memory by surprise."""
    if all(c.cfg.model.name == "tiny" and c.cfg.train.device == "cpu" and c.cfg.train.threads == 1
           and c.cfg.train.world_size == 1 for c in cells):
        return max(1, min(os.cpu_count() or 1, len(cells)))
    return 1


def oversubscription(cells: list["Cell"], workers: int, cpus: int) -> str | None:
    """A one-line note when `workers` cells at once want more torch threads than `cpus` (each cell
    `train.threads` per rank): such cells contend for the cores and run much slower than one at a time
    (two 2-thread SmolLM2 cells on 2 cores took over 10 minutes where each takes 1-2 alone)."""
    at_once = min(workers, len(cells))
    threads = max((c.cfg.train.threads * c.cfg.train.world_size for c in cells), default=0)
    if at_once < 2 or at_once * threads <= cpus:
        return None
    return (f"note: {at_once} workers x {threads} torch threads a cell = {at_once * threads} threads on {cpus} CPUs; "
            f"the cells will contend for the cores (--set train.threads={max(1, cpus // at_once)} or fewer --workers)")


def write_manifest(out: Path, cells: list[Cell]) -> None:
    """`<out>/grid.json`: every cell any run on this folder asked for, so `harness status` can
    list the pending ones."""
    path = Path(out) / "grid.json"
    known = {c["path"]: c for c in store.read_grid(out)}
    for cell in cells:
        rel = cell.path.relative_to(out).as_posix()
        known[rel] = {"path": rel, "label": cell.label, "steps": cell.cfg.train.steps}
    store.atomic_write_json(path, {"cells": sorted(known.values(), key=lambda c: c["path"])})


def run_grid(cells: list[Cell], cache_dir: Path | None = None, progress: bool = True, workers: int = 1,
             backend: str = "local", ray_address: str | None = None, ckpt_every: int = 0,
             retry_failed: bool = False, out: Path | None = None) -> dict[str, int]:
    """Run every cell not yet done. Returns counts: done (this run), skipped (done before), failed
    (this run), left_failed (failed before, left alone without `retry_failed`), resumed."""
    if workers < 1:
        raise HarnessError(f"--workers must be a positive integer, got {workers}")
    if ckpt_every < 0:
        raise HarnessError(f"--ckpt-every must be >= 0 (0: no checkpoints), got {ckpt_every}")
    if backend not in ("local", "ray"):
        raise HarnessError(f"--backend must be local or ray, got {backend!r}")
    counts = {"done": 0, "skipped": 0, "failed": 0, "left_failed": 0, "resumed": 0, "unreadable": 0}
    if not cells:
        return counts
    out = Path(out) if out is not None else cells[0].path.parents[3]  # <out>/<suite>/<algo>/<noise>/seed<k>
    store.check_out_dir(out)  # a folder of the user's is refused before anything is read or written
    store.read_grid(out)  # an unreadable grid.json stops the run before it is overwritten
    todo, done = [], []
    for cell in cells:
        try:
            state = (store.read_status(cell.path) or {}).get("state")
        except store.StoreError as exc:
            if store.last_step(cell.path) >= cell.cfg.train.steps:  # finished data: never discarded
                counts["unreadable"] += 1
                say(f"cell {cell.label}: {exc}; its metrics reach the final step, so it is left as it is "
                    "(restore its status.json, or delete the cell's folder to run it again)")
                continue
            say(f"cell {cell.label}: {exc}; it had not finished, so it runs again")
            state = None
        if state == "done":
            counts["skipped"] += 1
            done.append(cell)
        elif state == "failed" and not retry_failed:
            counts["left_failed"] += 1
            say(failed_earlier_line(cell))
        else:
            todo.append(cell)

    if not cells[0].node.leader:
        return follow_grid(todo, cache_dir, ckpt_every, progress, counts)
    store.claim_store(out)
    lock = store.RunLock(out).acquire()
    try:
        with interrupt_signals():
            if lock.stale_pid is not None:
                say(f"took over the lock of {str(out)!r} left by pid {lock.stale_pid}, which is no longer running")
            for cell in done:
                checkpoints.prune_checkpoints(cell.path)  # a crash between "done" and the clean-up
            write_manifest(out, cells)
            if backend == "ray":
                outcomes = run_ray(todo, cache_dir, ckpt_every, ray_address)
            elif workers > 1 and len(todo) > 1:
                announce_warm_starts(todo, cache_dir)
                outcomes = run_processes(todo, cache_dir, ckpt_every, workers, progress)
            else:
                outcomes = run_serial(todo, cache_dir, ckpt_every, progress)
    except KeyboardInterrupt:
        mark_interrupted(todo)
        raise
    finally:
        lock.release()
    return count_outcomes(outcomes, counts)


def failed_earlier_line(cell: Cell) -> str:
    """What a run says of a cell it leaves failed: why it failed, whether its configuration changed
    since, and the flag that re-runs it."""
    status = read_status_or_none(cell)
    reason = store.one_line(str(status.get("reason", "")), 200)
    changed = "; its configuration has changed since" if config_change(cell) == "its configuration changed" else ""
    return (f"cell {cell.label}: failed earlier (at step {status.get('step', '?')}: {reason}){changed}; left as it "
            "is: --retry-failed re-runs it")


def announce_warm_starts(todo: list[Cell], cache_dir: Path | None) -> None:
    """Before cells start in worker processes (whose progress shows 0% until a cell ends): say which
    tiny-model warm starts are not cached yet, which the first cells train (once) before their steps."""
    from types import SimpleNamespace

    from harness.models import default_cache_dir, warmstart_key

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    missing = {}
    for cell in todo:
        cfg = cell.cfg
        if cfg.model.name != "tiny" or cfg.model.warmstart_steps == 0:
            continue
        suite = SimpleNamespace(name=cfg.suite, options=cfg.suite_options)
        path = cache / "warmstart" / warmstart_key(cfg.model, suite, cfg.seed)
        if not (path / "done").exists():
            missing[path] = cfg.model.warmstart_steps
    if missing:
        steps = ", ".join(sorted({str(s) for s in missing.values()}))
        say(f"training the tiny model's warm start first ({len(missing)} of them, {steps} supervised steps each, "
            f"once; cached in {cache / 'warmstart'}): the cells' progress starts after it")


def follow_grid(todo: list[Cell], cache_dir, ckpt_every: int, progress: bool, counts: dict[str, int]) -> dict[str, int]:
    """Node rank > 0 of a multi-node grid: start this node's ranks of every cell the leader (node 0)
    runs, in the same order. The leader holds the store's lock and writes every status; this node
    writes nothing but its ranks' shares of checkpoints, so the store must be on a shared filesystem."""
    with interrupt_signals():
        outcomes = run_serial(todo, cache_dir, ckpt_every, progress)
    return count_outcomes(outcomes, counts)


def count_outcomes(outcomes: list[tuple[Cell, dict]], counts: dict[str, int]) -> dict[str, int]:
    """Add the cells' ends to `counts`; a fatal reason (bad input, an unwritable store) stops the run."""
    fatal = None
    for cell, status in outcomes:
        if status.get("resumed_from"):
            counts["resumed"] += 1
        if status.get("state") == "done":
            counts["done"] += 1
        else:
            counts["failed"] += 1
            fatal = fatal or (status.get("reason") if status.get("fatal") else None)
    if fatal:
        raise HarnessError(fatal)
    return counts


def mark_interrupted(cells: list[Cell]) -> None:
    """After an interrupt: a cell still marked running (its worker was killed before it could say so)
    becomes interrupted, which the next run resumes from its last checkpoint."""
    for cell in cells:
        status = store.read_status(cell.path) or {}
        if status.get("state") == "running":
            info = {k: v for k, v in status.items() if k not in ("state", "time", "step", "reason")}
            store.write_status(cell.path, "interrupted", step=store.last_step(cell.path), reason="interrupted", **info)


def report_failure(cell: Cell, status: dict[str, Any]) -> None:
    if status.get("state") != "done":
        say(f"cell {cell.label} failed at step {status.get('step', '?')}: {status.get('reason')}")


def run_serial(todo: list[Cell], cache_dir, ckpt_every: int, progress: bool) -> list[tuple[Cell, dict]]:
    outcomes = []
    bar = tqdm(todo, desc="grid", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.label)
        status = run_cell(cell, cache_dir, ckpt_every, progress)
        report_failure(cell, status)
        outcomes.append((cell, status))
        if status.get("fatal"):
            break
    return outcomes


def _die_with(grid_pid: int) -> None:
    """Watchdog thread of a worker: a `kill -9` of the grid must not leave cells writing behind
    the back of the next run, so a worker kills itself within a second of the grid's death."""
    while store.pid_alive(grid_pid):
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _worker_main(cell: Cell, cache_dir, ckpt_every: int, grid_pid: int, conn) -> None:
    """Entry point of a worker process: runs one cell, sends its status back (the status.json it
    could not write, on a full disk), dies with the grid. SIGINT or SIGTERM (from the grid, or to
    the whole process group) marks the cell interrupted and ends the worker quietly."""
    threading.Thread(target=_die_with, args=(grid_pid,), daemon=True).start()
    InterruptOnce().install()
    # tqdm's default lock is a multiprocessing lock, in a forkserver child a named semaphore that the
    # resource tracker must clean up when the worker is killed (and then warns, after the grid's last
    # line); a worker shares no progress bar with other processes, so a thread lock is enough.
    tqdm_std.set_lock(threading.RLock())  # on the base class: every tqdm class of the worker gets it
    try:
        conn.send(run_cell(cell, cache_dir, ckpt_every, progress=False))
        conn.close()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)


INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT
WORKER_GRACE_S = 10.0  # how long an interrupted grid waits for its workers to mark their cells


def run_processes(todo: list[Cell], cache_dir, ckpt_every: int, workers: int, progress: bool) -> list[tuple[Cell, dict]]:
    """One fresh process per cell, at most `workers` at once. Workers are forked from a forkserver
    that imported the training code once (no state shared with this process, cheap starts). A
    worker that dies (killed by the out-of-memory killer, a segfault) fails only its cell."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["harness.grid", "harness.trainer", "transformers.models.llama.modeling_llama"])
    queue, running, outcomes = list(todo), {}, []
    bar = tqdm(total=len(todo), desc=f"grid ({workers} workers)", unit="cell", disable=not progress)
    try:
        while queue or running:
            stop = any(status.get("fatal") for _, status in outcomes)
            while queue and len(running) < workers and not stop:
                cell = queue.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, args=(cell, cache_dir, ckpt_every, os.getpid(), send),
                                   name=cell.label)
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, cell, receive)
            if not running:
                break
            for sentinel in wait_for(list(running)):
                proc, cell, receive = running.pop(sentinel)
                proc.join()
                try:
                    sent = receive.recv() if receive.poll() else None
                except (EOFError, OSError):
                    sent = None
                receive.close()
                status = sent if sent is not None else read_status_or_none(cell)
                if status.get("state") not in ("done", "failed") and not status.get("fatal"):
                    how = f"killed by signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit code {proc.exitcode}"
                    reason = f"worker process died ({how}{'; out of memory?' if proc.exitcode == -9 else ''})"
                    store.write_status(cell.path, "failed", step=store.last_step(cell.path), reason=reason,
                                       **{k: v for k, v in status.items() if k not in ("state", "time", "step", "reason")})
                    status = store.read_status(cell.path)
                report_failure(cell, status)
                outcomes.append((cell, status))
                bar.update(1)
    finally:
        # Interrupted: pass the signal on (a worker ignores a second one, e.g. when Ctrl-C reached the
        # whole group), give the workers a few seconds to mark their cells interrupted, then kill.
        for proc, _, _ in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + WORKER_GRACE_S
        for proc, _, _ in running.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        bar.close()
    return outcomes


def start_ray(address: str | None):
    """`(ray, started)`: Ray imported and connected (`address`, else a local instance that gets
    this checkout on its workers' path); `started` when this call started it."""
    try:
        import ray
    except ImportError:
        raise HarnessError("--backend ray needs Ray: pip install 'noise-robust-rl-harness[ray]'") from None
    started = not ray.is_initialized()
    if started:
        root = str(Path(__file__).resolve().parents[1])
        env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if "TRANSFORMERS_VERBOSITY" in os.environ:
            env["TRANSFORMERS_VERBOSITY"] = os.environ["TRANSFORMERS_VERBOSITY"]
        kwargs = {"address": address} if address else {"include_dashboard": False}
        ray.init(runtime_env={"env_vars": env}, logging_level="ERROR", **kwargs)
    return ray, started


def ray_resources(cfg: RunConfig) -> dict[str, float]:
    """A cell's Ray resource request: `train.threads` CPUs, one GPU when it trains on cuda."""
    return {"num_cpus": cfg.train.threads, "num_gpus": 1 if cfg.train.device == "cuda" else 0}


def run_ray(todo: list[Cell], cache_dir, ckpt_every: int, address: str | None) -> list[tuple[Cell, dict]]:
    """Each cell a Ray task with its resource request. Every node must see `--out` and the cache
    (a shared filesystem) and have the harness installed; a local instance gets this checkout."""
    ray, started = start_ray(address)
    outcomes = []
    sharded = [cell for cell in todo if cell.cfg.train.world_size > 1]
    todo = [cell for cell in todo if cell.cfg.train.world_size == 1]
    try:  # a sharded cell is a Ray Train job of its own, started from here, one after the other
        for cell in sharded:
            status = run_cell(cell, cache_dir, ckpt_every, False, backend="ray")
            report_failure(cell, status)
            outcomes.append((cell, status))
    finally:
        if started and not todo:
            ray.shutdown()
    if not todo:
        return outcomes
    task = ray.remote(max_retries=0)(run_cell)
    pending = {task.options(**ray_resources(cell.cfg)).remote(cell, cache_dir, ckpt_every, False): cell
               for cell in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    status = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the task's worker died (OOM kill, node lost)
                    store.write_status(cell.path, "failed", step=store.last_step(cell.path),
                                       reason=f"ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    status = store.read_status(cell.path)
                report_failure(cell, status)
                outcomes.append((cell, status))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return outcomes

