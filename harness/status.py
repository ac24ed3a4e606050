"""`harness status`: the state of every cell of a run store, read from its files."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from harness import checkpoints, store
from harness.errors import HarnessError


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
        ckpt = checkpoints.latest_checkpoint(path)
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
