"""A cell's checkpoints: `<cell>/ckpt/step<k>/`, each written whole (`store.atomic_dir`) with a
manifest of its files' sizes and SHA-256 (and the metrics/eval files' lengths at that step), verified
before a resume uses it; the newest `KEEP_CHECKPOINTS` are kept until the cell is done.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError
from harness.store import (StoreError, atomic_dir, atomic_write_json, file_size, naming, read_json, read_jsonl,
                           truncate)


def checkpoint_dir(cell: Path, step: int) -> Path:
    return Path(cell) / "ckpt" / f"step{step:08d}"


# A single-process checkpoint is `ckpt/step<k>/state.pt` (torch.save of tensors and plain data:
# it loads with weights_only=True, so it cannot run code) and `ckpt/step<k>/manifest.json`:
# the format, the step, the size and SHA-256 of state.pt, and the byte length and SHA-256 of the
# prefix of each JSONL file it covers. Everything is verified before the checkpoint is used.
CHECKPOINT_FORMAT = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINTED_FILES = ("metrics.jsonl", "eval.jsonl")
KEEP_CHECKPOINTS = 2  # the newest and the one before, to fall back to when the newest is corrupt


class CheckpointInvalid(Exception):
    """A checkpoint that failed verification; the message says why."""


def sha256_of(path: Path, size: int | None = None) -> str:
    """SHA-256 of a file's first `size` bytes (the whole file when None)."""
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


class _WholeWrites:
    """A file for torch.save that writes every byte or raises, remembering why: torch's zip writer
    turns anything raised in a write into a bare RuntimeError, a full disk's OSError and also the
    KeyboardInterrupt of a SIGINT / SIGTERM that lands mid-write (which must end the cell as
    interrupted, not failed)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while len(view):
                view = view[os.write(self.fh.fileno(), view):]
        except (OSError, KeyboardInterrupt) as exc:
            self.error = exc
            raise
        return len(data)

    def flush(self) -> None:
        pass


def save_tensors(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)`; a failed write is an OSError naming `path`, an interrupt during it a
    KeyboardInterrupt."""
    import torch

    with naming(path), open(path, "wb", buffering=0) as fh:
        writer = _WholeWrites(fh)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def checkpoint_manifest(cell: Path, folder: Path, step: int) -> dict[str, Any]:
    """The manifest of a checkpoint whose state.pt is written in `folder`, covering the cell's
    JSONL files as they are now."""
    state = Path(folder) / STATE_FILE
    files = {}
    for name in CHECKPOINTED_FILES:
        path = Path(cell) / name
        files[name] = {"bytes": file_size(path), "sha256": sha256_of(path) if path.exists() else sha256_of_bytes(b"")}
    return {"format": CHECKPOINT_FORMAT, "step": step,
            "state": {"file": STATE_FILE, "bytes": state.stat().st_size, "sha256": sha256_of(state)}, "files": files}


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_checkpoint(cell: Path, folder: Path) -> dict[str, Any]:
    """The manifest of `folder` once state.pt and every JSONL prefix it covers match their
    checksums and every covered line is a JSON object; `CheckpointInvalid` otherwise."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / MANIFEST_FILE, dict, ("format", "step", "state", "files"))
    except StoreError as exc:
        raise CheckpointInvalid(f"its {MANIFEST_FILE} is unusable ({str(exc).split(': ', 1)[-1]})") from None
    if manifest["format"] != CHECKPOINT_FORMAT:
        raise CheckpointInvalid(f"unknown checkpoint format {manifest['format']!r} (this harness reads {CHECKPOINT_FORMAT})")
    if manifest["step"] != int(folder.name[4:]):
        raise CheckpointInvalid(f"its manifest is for step {manifest['step']!r}")
    try:
        state, files = manifest["state"], manifest["files"]
        expected = [(folder / STATE_FILE, int(state["bytes"]), str(state["sha256"]), False)]
        expected += [(Path(cell) / name, int(files[name]["bytes"]), str(files[name]["sha256"]), True)
                     for name in CHECKPOINTED_FILES]
    except (KeyError, TypeError, ValueError):
        raise CheckpointInvalid(f"its {MANIFEST_FILE} lacks sizes or checksums") from None
    for path, size, digest, prefix in expected:
        have = file_size(path)
        if not path.exists() and size > 0:
            raise CheckpointInvalid(f"{path.name} is missing")
        if have < size or (not prefix and have != size):
            raise CheckpointInvalid(f"{path.name} has {have} bytes, the checkpoint recorded {size}")
        if (sha256_of(path, size) if path.exists() else sha256_of_bytes(b"")) != digest:
            what = f"its first {size} bytes do" if prefix else "it does"
            raise CheckpointInvalid(f"{path.name}: {what} not match the checkpoint's checksum")
        if prefix and path.exists():
            try:
                read_jsonl(path, upto=size)
            except StoreError as exc:
                raise CheckpointInvalid(str(exc)) from None
    return manifest


def checkpoints(cell: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every checkpoint folder of a cell holding a state and a manifest, newest first."""
    found = []
    for path in (Path(cell) / "ckpt").glob("step*"):
        if path.is_dir() and path.name[4:].isdigit() and (path / STATE_FILE).is_file() \
                and (path / MANIFEST_FILE).is_file():
            found.append((int(path.name[4:]), path))
    return sorted(found, reverse=True)


def latest_checkpoint(cell: Path) -> tuple[int, Path] | None:
    """`(step, folder)` of the newest checkpoint of a cell (not verified), or None."""
    found = checkpoints(cell)
    return found[0] if found else None


def usable_checkpoint(cell: Path, on_reject=None) -> tuple[int, Path] | None:
    """The newest checkpoint that passes `verify_checkpoint`, or None. Each one rejected on the
    way is handed to `on_reject(step, reason)` and removed."""
    bad = [p for p in (Path(cell) / "ckpt").glob("step*")
           if p.is_dir() and p.name[4:].isdigit() and (p / STATE_FILE).exists() and not (p / MANIFEST_FILE).exists()]
    for path in sorted(bad, reverse=True):  # a state without a manifest: no checksum to trust
        if on_reject is not None:
            on_reject(int(path.name[4:]), f"it has no {MANIFEST_FILE} (written by an older harness, or incomplete)")
        shutil.rmtree(path)
    for step, path in checkpoints(cell):
        try:
            verify_checkpoint(cell, path)
        except CheckpointInvalid as exc:
            if on_reject is not None:
                on_reject(step, str(exc))
            shutil.rmtree(path)
            continue
        return step, path
    return None


def prune_checkpoints(cell: Path, keep: Path | None = None) -> None:
    """Remove the checkpoints of a cell except `keep` and the one before it (all of them when `keep`
    is None)."""
    root = Path(cell) / "ckpt"
    if not root.exists():
        return
    kept = []
    if keep is not None:
        older = [p for s, p in checkpoints(cell) if p != keep and s < int(Path(keep).name[4:])]
        kept = [Path(keep), *older[:KEEP_CHECKPOINTS - 1]]
    for path in root.iterdir():
        if path not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if keep is None:
        root.rmdir()


def write_checkpoint(cell: Path, step: int, state: dict[str, Any]) -> None:
    """Atomically write `ckpt/step<k>/` of a one-process cell (then drop all but it and the one
    before): `state` as state.pt and the manifest with its checksum and the byte lengths and checksums
    of metrics.jsonl and eval.jsonl, so a resume verifies them and cuts off lines written after it."""
    final = checkpoint_dir(cell, step)
    with atomic_dir(final) as tmp:
        save_tensors(state, tmp / STATE_FILE)
        atomic_write_json(tmp / MANIFEST_FILE, checkpoint_manifest(cell, tmp, step))
    prune_checkpoints(cell, keep=final)


def load_checkpoint(cell: Path, folder: Path, manifest: dict[str, Any], load_state: Callable[[dict], None]) -> dict:
    """Load the verified checkpoint in `folder` through `load_state` (the trainer's `load_state_dict`),
    truncate the cell's JSONL files to it; return its summary. A state that does not load with
    weights_only=True (anything but tensors and plain data: it could run code) is refused with a
    HarnessError."""
    import torch

    path = Path(folder) / STATE_FILE
    try:
        # To the CPU: load_state_dict moves each tensor to its module's device, and the RNG states
        # must stay CPU ByteTensors whatever device the cell runs on.
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_state(state)
        summary = dict(state["summary"])
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, it is not loaded
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{str(path)!r}: refused: it is not a checkpoint of this cell that loads with "
                           f"weights_only=True ({type(exc).__name__}: {first[:160]}); nothing in it was run. "
                           f"Delete {str(Path(folder))!r} to resume from an older checkpoint or step 0") from None
    for name, info in manifest["files"].items():
        truncate(Path(cell) / name, int(info["bytes"]))
    return summary


# ---- what a one-process trainer's checkpoint holds -------------------------------------------------

def trainer_state(trainer) -> dict[str, Any]:
    """A one-process trainer's checkpoint state: everything a step depends on that is not rebuilt
    from the configuration: the trained modules, the optimisers, every global RNG, and any state an
    algorithm or noise injector keeps
    (through their own `state_dict`, when they define one). The reference policy is not saved:
    it is the initial policy, rebuilt from the warm start. The data order and the rollout,
    noise, minibatch and critic-loss generators are pure functions of (seed, step, ...), and
    algorithms, critics and heads hold no random state of their own (`algorithms.base`). Only
    tensors and plain data (numbers, strings, lists, dicts), so the checkpoint loads with
    weights_only=True."""
    from harness import lora
    from harness.seeding import rng_state

    trained = lora.trained_state if trainer.lora else (lambda module: module.state_dict())
    state: dict[str, Any] = {
        "policy": trained(trainer.policy),  # under LoRA: its adapters (the critic's adapter too), not the base
        "heads": trainer.heads.state_dict(),
        "actor_opt": trainer.actor_opt.state_dict(),
        "rng": rng_state(),
    }
    if trainer.critic is not None:  # a shared critic's backbone (or a LoRA critic's adapter) is saved as the policy
        state["critic"] = trained(critic_part(trainer))
    if trainer.critic_opt is not None:
        state["critic_opt"] = trainer.critic_opt.state_dict()
    for name, obj in (("algo", trainer.algo), ("noise", trainer.noise)):
        if hasattr(obj, "state_dict"):
            state[name] = obj.state_dict()
    return state


def critic_part(trainer):
    """The critic's part that a checkpoint holds: the head alone when its backbone is the policy's."""
    from harness import lora

    on_policy_base = trainer.shared_critic or isinstance(trainer.critic, lora.LoraCritic)
    return trainer.critic.head if on_policy_base else trainer.critic


def load_trainer_state(trainer, state: dict[str, Any]) -> None:
    """Load `trainer_state`'s dict into the trainer's modules, optimisers, RNGs, algorithm and noise."""
    from harness import lora
    from harness.seeding import set_rng_state

    load = lora.load_trained_state if trainer.lora else (lambda module, s: module.load_state_dict(s))
    load(trainer.policy, state["policy"])
    trainer.heads.load_state_dict(state["heads"])
    trainer.actor_opt.load_state_dict(state["actor_opt"])
    if trainer.critic is not None:
        load(critic_part(trainer), state["critic"])
    if trainer.critic_opt is not None:
        trainer.critic_opt.load_state_dict(state["critic_opt"])
    for name, obj in (("algo", trainer.algo), ("noise", trainer.noise)):
        if name in state:
            obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
