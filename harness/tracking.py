"""Experiment tracking: `harness run --log-to tensorboard,wandb,mlflow`.

Each cell is one tracked run named `<suite>/<algo>/<noise>/seed<k>`, grouped by grid (the `--out`
folder's name), holding the resolved configuration, every per-step metric at its step and the
ID/OOD evaluation rows (`eval/<role>/<benchmark>/<metric>`). Offline by default:

    tensorboard  event files in the cell's `tensorboard/` (`tensorboard --logdir <out>`)
    wandb        W&B offline mode, files in the cell's `wandb/` (`wandb sync` uploads them later);
                 WANDB_MODE=online logs to the server instead
    mlflow       MLflow's local file store `<out>/mlruns` (`mlflow ui --backend-store-uri <out>/mlruns`);
                 MLFLOW_TRACKING_URI points elsewhere

A resumed cell continues the same tracked run: the run ids and the last step each backend has
are kept in the cell's `tracking.json`; TensorBoard hides the steps after the checkpoint
(`purge_step`) and gets them again, W&B and MLflow are not sent a step they already have.

The trainer calls `log_metrics(step, metrics)` and `log_eval(step, rows)`; the grid opens and
closes the tracker around a cell.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from harness import store
from harness.errors import HarnessError

BACKENDS = ("tensorboard", "wandb", "mlflow")
# backend -> (module to import, extra to install)
REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
STATE_FILE = "tracking.json"


def parse_backends(text: str | None) -> tuple[str, ...]:
    """`"tensorboard,mlflow"` -> ("tensorboard", "mlflow"); unknown names and missing libraries
    are one-line errors, before anything is written."""
    parts = [n.strip() for n in (text or "").split(",")]
    if "" in parts and any(parts):
        raise HarnessError(f"--log-to has an empty item in {text!r}: ',' must separate two names")
    names = [n for n in parts if n]
    for name in names:
        if name not in BACKENDS:
            raise HarnessError(f"--log-to: unknown backend {name!r} (valid: {', '.join(BACKENDS)})")
        module, extra = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            raise HarnessError(f"--log-to {name} needs {module}: pip install 'noise-robust-rl-harness[{extra}]'")
    if len(set(names)) != len(names):
        raise HarnessError(f"--log-to lists a backend twice: {text!r}")
    return tuple(names)


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics line (not its step)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_numbers(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {f"eval/{r['role']}/{r['benchmark']}/{r['metric']}": float(r["value"]) for r in rows
            if isinstance(r.get("value"), (int, float))}


def flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class TensorBoardRun:
    purges_on_resume = True  # a resumed writer hides the steps after the checkpoint and writes them again

    def __init__(self, cell: Path, label: str, group: str, config: dict, resumed_from: int, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed cell hides what the crashed process wrote after its checkpoint.
        self.writer = SummaryWriter(log_dir=str(cell / "tensorboard"),
                                    purge_step=resumed_from + 1 if resumed_from else None)
        if not resumed_from:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)
            self.writer.add_text("run", f"{label} (grid {group})", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, state: str) -> None:
        self.writer.close()


class WandbRun:
    purges_on_resume = False

    def __init__(self, cell: Path, label: str, group: str, config: dict, resumed_from: int, state: dict):
        import wandb

        self.wandb = wandb
        run_id = state.get("run_id") or uuid.uuid4().hex[:12]
        state["run_id"] = run_id
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "noise-robust-rl"), group=group, name=label,
                              id=run_id, resume="allow", config=config, dir=str(cell),
                              mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, state: str) -> None:
        self.run.finish(exit_code=0 if state == "done" else 1)


MLFLOW_NAME = re.compile(r"[^\w\-./ ]")


class MlflowRun:
    purges_on_resume = False

    def __init__(self, cell: Path, label: str, group: str, config: dict, resumed_from: int, state: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the local file store, which MLflow 3 keeps only behind this opt-in
            uri = (cell.parents[3] / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(group)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(group)
        run = self.client.create_run(exp_id, run_name=label, tags={"harness.cell": label, "harness.grid": group})
        self.run_id = state["run_id"] = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(MLFLOW_NAME.sub("_", k), v, stamp, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if state == "done" else "FAILED")


RUNS = {"tensorboard": TensorBoardRun, "wandb": WandbRun, "mlflow": MlflowRun}


class Tracker:
    """The tracked runs of one cell, one per backend. With no backend every call does nothing."""

    def __init__(self, backends: tuple[str, ...] = (), cell: Path | None = None, label: str = "", group: str = "",
                 config: dict | None = None, resumed_from: int = 0):
        self.runs: dict[str, Any] = {}
        if not backends:
            return
        self.path = Path(cell) / STATE_FILE
        self.state = store.read_json(self.path) if resumed_from and self.path.exists() else {}
        try:
            for name in backends:
                self.state.setdefault(name, {})
                self.runs[name] = RUNS[name](Path(cell), label, group, config or {}, resumed_from, self.state[name])
        except BaseException:
            self.close("failed")
            raise
        self.save()

    def save(self) -> None:
        store.atomic_write_json(self.path, self.state)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Send `values` of `kind` (metrics or eval) at `step` to every backend that has not had them."""
        if not self.runs or not values:
            return
        for name, run in self.runs.items():
            if run.purges_on_resume or step > self.state[name].get(kind, -1):
                run.log(step, values)
                self.state[name][kind] = step
        self.save()

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """A training step's metrics line (its eval/* summary included)."""
        self.log("metrics", step, numbers(metrics))

    def log_eval(self, step: int, rows: list[dict[str, Any]]) -> None:
        """The evaluation rows of `step` (every benchmark and metric)."""
        self.log("eval", step, eval_numbers(rows))

    def close(self, state: str) -> None:
        for run in self.runs.values():
            run.close(state)
        self.runs = {}
