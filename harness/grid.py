"""The grid: resolve every cell's configuration up front (bad input fails before anything is
written), then run the cells (serially, in `--workers` processes, or as Ray tasks), skipping those
already done, resuming unfinished ones from their last checkpoint, and containing failures.

A cell's outcome lives in its status.json, written by the process that ran it:

    running      {"pid", "host", "resumed_from", "attempt"}
    done         {"final_step", "<role>_accuracy", "resumed_from", "attempt"}
    failed       {"step", "reason", "traceback"}; left alone unless `--retry-failed`
    interrupted  {"step", "reason"} (SIGINT or SIGTERM, to the run or its process group); resumed by
                 the next run like a crashed cell
"""
from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as tqdm_std

from algorithms import ALGOS
from harness import store
from harness.config import (SECTIONS, RunConfig, apply_section_overrides, convert, options_dataclass,
                            resolved_old_logp, set_dataclass_field, split_overrides, validate_core)
from harness.errors import HarnessError
from harness.export import save_model
from harness.launch import NodeLaunch
from harness.models import MODEL_ALIASES, check_local_model
from harness.signals import InterruptOnce, interrupt_signals
from harness.tracking import Tracker
from noise import parse_noise_list
from tasks import SUITES

# The mission's algorithms, in this order, as far as they are registered.
MISSION_ALGOS = ("ppo", "grpo", "dvpo", "flowrl", "dfpo")


# The spec's head sizes are meant for 8B policies. On the tiny offline model (hidden size 64) a
# 1024-wide flow head costs 16x PPO's step; 64 wide it costs 1.55x (measured on the default arith
# configuration). Applied only with --model tiny, only where the user sets nothing else, and
# written to config.json like every other option.
TINY_MODEL_OVERRIDES = {"dfpo.flow_width": "64"}


def with_tiny_model_overrides(overrides: dict[str, str], algos: list[str], model: str | None) -> dict[str, str]:
    if (model or overrides.get("model.name", "tiny")) != "tiny":
        return overrides
    out = dict(overrides)
    for key, value in TINY_MODEL_OVERRIDES.items():
        base, _, name = key.partition(".")
        for algo in algos:  # the algorithm and its named variants (subclasses, e.g. dfpo_tails_off)
            if (base in ALGOS and issubclass(ALGOS.get(algo), ALGOS.get(base)) and f"{algo}.{name}" not in out
                    and f"algo.{name}" not in out):
                out[f"{algo}.{name}"] = value
    return out


def with_real_model_defaults(overrides: dict[str, str], model: str | None) -> dict[str, str]:
    """Defaults for a real model, under anything the user sets: one torch thread per core (its cells
    run one at a time, see `default_workers`, while tiny-model cells run one per core,
    single-threaded), and gradient checkpointing (the activations of long responses are what fills
    memory)."""
    if (model or overrides.get("model.name", "tiny")) == "tiny":
        return overrides
    return {"train.threads": str(os.cpu_count() or 1), "train.gradient_checkpointing": "true", **overrides}


def default_workers(cells: list["Cell"]) -> int:
    """One worker per core when every cell is a tiny-model CPU cell (single-threaded training, about
    0.5 GiB each); otherwise 1 (a cell of several ranks uses a core per rank), so cells never share a GPU or a large model's memory by surprise."""
    if all(c.cfg.model.name == "tiny" and c.cfg.train.device == "cpu" and c.cfg.train.threads == 1
           and c.cfg.train.world_size == 1 for c in cells):
        return max(1, min(os.cpu_count() or 1, len(cells)))
    return 1


def default_algos() -> list[str]:
    return [name for name in MISSION_ALGOS if name in ALGOS]


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


def comma_list(text: str, flag: str) -> list[str]:
    """`"a, b"` -> ["a", "b"]; an empty item (`"a,,b"`, a trailing comma) is refused."""
    parts = [p.strip() for p in str(text).split(",")]
    if "" in parts and any(parts):
        raise HarnessError(f"{flag} has an empty item in {text!r}: ',' must separate two names")
    return [p for p in parts if p]
MAX_SEED = 2 ** 63
MAX_SEED_COUNT = 10_000


def parse_seeds(text: str) -> list[int]:
    """`"3"` -> [0, 1, 2]; `"0,5,7"` -> [0, 5, 7]; `"5,"` -> [5] (a list of one seed, as a grid file's [5])."""
    text = str(text).strip()
    one_seed = text.endswith(",") and text.count(",") == 1
    parts = comma_list(text[:-1] if one_seed else text, "--seeds")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise HarnessError(f"--seeds takes a count (e.g. 2) or a comma list of seeds (e.g. 0,1,5), got {text!r}") from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise HarnessError(f"--seeds count must be at least 1, got {values[0]}")
        if values[0] > MAX_SEED_COUNT:
            raise HarnessError(f"--seeds count must be at most {MAX_SEED_COUNT}, got {values[0]}")
        return list(range(values[0]))
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise HarnessError(f"--seeds list must hold distinct non-negative integers, got {text!r}")
    if any(v >= MAX_SEED for v in values):
        raise HarnessError(f"--seeds must be below 2**63 (a seed names a folder and seeds 64-bit streams), got {text!r}")
    return values


def parse_algos(text: str) -> list[str]:
    names = comma_list(text, "--algos")
    if not names:
        raise HarnessError(f"--algos needs at least one algorithm (valid: {', '.join(ALGOS.names())})")
    for name in names:
        ALGOS.get(name)
    if len(set(names)) != len(names):
        raise HarnessError(f"--algos lists an algorithm twice: {text!r}")
    return names


def resolve_options(options_cls: type, groups: dict[str, dict[str, str]], shared: str, own: str) -> dict[str, Any]:
    """Options of one algorithm (or the suite): shared keys it has, then its own keys."""
    field_names = {f.name for f in dataclasses.fields(options_cls)}
    overrides = {k: v for k, v in groups.get(shared, {}).items() if k in field_names}
    overrides.update(groups.get(own, {}))
    return dataclasses.asdict(options_dataclass(options_cls, overrides, own))


def algo_sections(own: dict[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split the `<algo>.*` keys into core keys for that algorithm's cells only (`ppo.train.lr=1e-4`
    -> {"train": {"lr": "1e-4"}}; what a tuned grid file sets) and the algorithm's own options."""
    sections: dict[str, dict[str, str]] = {}
    options: dict[str, str] = {}
    for key, value in own.items():
        section, dot, name = key.partition(".")
        if dot and section in SECTIONS:
            sections.setdefault(section, {})[name] = value
        else:
            options[key] = value
    return sections, options


def build_cells(suite: str, algos: list[str], noise: str, seeds: list[int], out: Path,
                model: str | None = None, steps: int | None = None, eval_limit: int | None = None,
                overrides: dict[str, str] | None = None, check_data: bool = True) -> list[Cell]:
    """The grid's cells, every configuration resolved and validated; with `check_data`, the suite's
    benchmarks are also checked to be had (`harness plan` needs no data)."""
    suite_cls = SUITES.get(suite)
    noise_specs = parse_noise_list(noise)
    overrides = {**getattr(suite_cls, "run_defaults", {}), **(overrides or {})}  # the user's --set wins
    overrides = with_real_model_defaults(with_tiny_model_overrides(overrides, algos, model), model)
    groups = split_overrides(overrides, ALGOS.names())
    for key in groups.get("algo", {}):
        if not any(key in {f.name for f in dataclasses.fields(ALGOS.get(a).Options)} for a in algos):
            raise HarnessError(f"config key 'algo.{key}' is an option of none of: {', '.join(algos)}")
    for name in groups:
        if name in ALGOS and name not in algos:
            raise HarnessError(f"--set {name}.* given but {name!r} is not in --algos ({', '.join(algos)})")
    suite_options = resolve_options(suite_cls.Options, groups, "suite", "suite")
    model_name = model or overrides.get("model.name", "tiny")
    if model_name in MODEL_ALIASES:
        MODEL_ALIASES[model_name]()  # a missing offline model stops the grid before it writes anything
    trust = convert(overrides.get("model.trust_remote_code", "false"), bool, "model.trust_remote_code")
    check_local_model(model_name, trust, weights=check_data)  # so does a local folder that is not there, or a damaged one
    data_check = getattr(suite_cls, "check_data", None) if check_data else None
    if data_check is not None:  # data that cannot be had stops the grid before it writes anything
        data_check(suite_cls.Options(**suite_options))
    cells = []
    for algo in algos:
        sections, own = algo_sections(groups.get(algo, {}))
        algo_options = resolve_options(ALGOS.get(algo).Options, {**groups, algo: own}, "algo", algo)
        for spec in noise_specs:
            for seed in seeds:
                cfg = RunConfig(suite=suite, algo=algo, noise=spec.name, seed=seed,
                                algo_options=algo_options, suite_options=suite_options)
                if model is not None:
                    cfg.model.name = model
                if steps is not None:
                    if steps < 1:
                        raise HarnessError(f"--steps must be a positive integer, got {steps}")
                    cfg.train.steps = steps
                if eval_limit is not None:
                    set_dataclass_field(cfg.eval, "limit", str(eval_limit), "--eval-limit")
                apply_section_overrides(cfg, groups)
                for section, items in sections.items():  # `<algo>.train.lr`: after the grid-wide keys
                    for name, text in items.items():
                        set_dataclass_field(getattr(cfg, section), name, text, f"{algo}.{section}.{name}")
                if sections:
                    validate_core(cfg)
                need = ALGOS.get(algo)(ALGOS.get(algo).Options(**algo_options)).min_group_size()
                if cfg.train.group_size < need:
                    raise HarnessError(f"{algo} compares the samples of a group: train.group_size must be >= {need} "
                                       f"(a group of {cfg.train.group_size} trains nothing), got {cfg.train.group_size}")
                if cfg.train.rollout_correction != "off" and not ALGOS.get(algo).supports_rollout_correction:
                    raise HarnessError(f"train.rollout_correction={cfg.train.rollout_correction}: {algo}'s actor loss takes "
                                       f"no per-token importance weights (the PPO-clip algorithms do); set it to off")
                cfg.algo_options = ALGOS.get(algo).cell_options(cfg.algo_options, cfg.train)
                cfg.train.old_logp = resolved_old_logp(cfg)
                cells.append(Cell(cfg, store.cell_dir(out, suite, algo, spec.name, seed)))
    return cells


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


def run_cell(cell: Cell, cache_dir: Path | None = None, ckpt_every: int = 0, progress: bool = False,
             backend: str = "local") -> dict[str, Any]:
    """Run one cell to the end in this process, resuming from its newest checkpoint that passes
    verification when its configuration is unchanged; write its status.json; return that status.
    An exception inside the cell (a non-finite loss, out of memory, a bug) marks it failed and
    does not propagate, except bad input (`HarnessError`, e.g. a model that cannot load) and a
    store that cannot be written (full disk, read-only), which the grid stops on. A cell of more
    than one rank (`train.nproc` x `train.nnodes`) runs as that many (`harness.launch`, torchrun or Ray Train)."""
    try:
        if cell.cfg.train.world_size > 1:
            from harness.launch import run_cell_ranks

            return run_cell_ranks(cell, cache_dir, ckpt_every, progress, backend)
        return _run_cell(cell, cache_dir, ckpt_every, progress)
    except OSError as exc:
        reason = write_error(cell, exc)
        if reason is None:
            raise
        status = {"state": "interrupted", "reason": reason, "fatal": True, "step": store.last_step(cell.path)}
        try:  # resumed by the next run once there is room; the write itself may fail again
            store.write_status(cell.path, "interrupted", reason=reason, step=status["step"])
        except OSError:
            pass
        return status


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

    found = store.usable_checkpoint(cell.path, on_reject=reject) if change is None else None
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


def _run_cell(cell: Cell, cache_dir: Path | None, ckpt_every: int, progress: bool) -> dict[str, Any]:
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
    store.prune_checkpoints(cell.path)
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
                store.prune_checkpoints(cell.path)  # a crash between "done" and the clean-up
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
        suite = SimpleNamespace(name=cfg.suite, options=SUITES.get(cfg.suite).Options(**cfg.suite_options))
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


def read_status_or_none(cell: Cell) -> dict[str, Any]:
    try:
        return store.read_status(cell.path) or {}
    except store.StoreError:
        return {}


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


# ---- harness status ------------------------------------------------------------------------------

def grid_status(out: Path) -> list[dict[str, Any]]:
    """One row per cell of `out` (those of grid.json and those on disk): label, state (done /
    running / failed / pending), step reached, total steps, checkpoint step, detail."""
    out = Path(out)
    if not out.is_dir():
        raise HarnessError(f"no run store at {str(out)!r} (give the --out folder of a harness run)")
    cells: dict[str, dict[str, Any]] = {c["path"]: {"label": c["label"], "steps": c.get("steps")}
                                         for c in store.read_grid(out)}
    for status_path in out.glob("*/*/*/seed*/status.json"):
        rel = status_path.parent.relative_to(out).as_posix()
        cells.setdefault(rel, {"label": rel, "steps": None})
    holder = store.lock_holder(out)
    host = socket.gethostname()
    rows = []
    for rel, info in sorted(cells.items()):
        path = out / rel
        try:
            status, unreadable = store.read_status(path) or {}, None
        except store.StoreError as exc:
            status, unreadable = {}, str(exc)
        state = status.get("state")
        steps = status.get("steps") if type(status.get("steps")) is int else info["steps"]
        step = store.last_step(path)
        ckpt = store.latest_checkpoint(path)
        detail = ""
        if unreadable:
            state, detail = "corrupt", unreadable
        elif state == "done":
            scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(status.items())
                               if k.endswith("_accuracy") and isinstance(v, (int, float)))
            detail = scores + (f"; resumed from step {status['resumed_from']}" if status.get("resumed_from") else "")
        elif state == "failed":
            step = status.get("step", step)
            detail = status.get("reason", "")
        elif state == "running" and holder is not None and (
                status.get("host") != host or store.pid_alive(int(status.get("pid", -1)))):
            detail = f"pid {status.get('pid')} on {status.get('host')}"
            if ckpt:
                detail += f"; checkpoint at step {ckpt[0]}"
        elif state in ("running", "interrupted"):
            state = "pending"
            detail = f"interrupted at step {step}; " + (
                f"resumes from the checkpoint at step {ckpt[0]}" if ckpt else "restarts from step 0 (no checkpoint)")
        else:
            state = "pending"
        rows.append({"cell": info["label"], "state": state, "step": step, "steps": steps,
                     "checkpoint": ckpt[0] if ckpt else None, "detail": detail})
    return rows
