"""`--log-to tensorboard,wandb,mlflow`: what each backend wrote, read back with the library's own
reader (TensorBoard's event accumulator, MLflow's client on the local store, `wandb leet inspect`
on W&B's offline run files), equals metrics.jsonl and eval.jsonl, also across a resume."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.tracking import parse_backends
from tests.conftest import fast_args

pytest.importorskip("tensorboard", reason="needs the [tensorboard] extra")
pytest.importorskip("mlflow", reason="needs the [mlflow] extra")
pytest.importorskip("wandb", reason="needs the [wandb] extra")

STEPS = 4
LABEL = "arith/ppo/none/seed0"


def run_args(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["run", "--algos", "ppo", "--noise", "none", "--seeds", "1", "--steps", str(STEPS), "--out", str(out),
            "--cache-dir", str(cache_dir), "--quiet", "--log-to", "tensorboard,wandb,mlflow", "--ckpt-every", "2",
            *extra, *fast_args()]


def expected_series(cell: Path) -> dict[str, dict[int, float]]:
    """key -> {step: value} from metrics.jsonl and eval.jsonl, as the tracker names them."""
    series: dict[str, dict[int, float]] = {}
    for line in (cell / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[row["step"]] = float(value)
    for line in (cell / "eval.jsonl").read_text().splitlines():
        row = json.loads(line)
        series.setdefault(f"eval/{row['role']}/{row['benchmark']}/{row['metric']}", {})[row["step"]] = row["value"]
    return series


def tensorboard_series(cell: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cell / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_series(out: Path, run_id: str, keys) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}
    return history, run


def wandb_series(cell: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict]]:
    """History rows of every offline run file of the cell (a resume adds one), through W&B's own reader."""
    series: dict[str, list[tuple[int, float]]] = {}
    runs = []
    wandb_bin = Path(shutil.which("wandb") or Path(sys.executable).parent / "wandb")
    for path in sorted(cell.glob("wandb/offline-run-*/run-*.wandb")):
        records = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(path)], check=True,
                                 capture_output=True, text=True).stdout.splitlines()
        for record in map(json.loads, records):
            if record.get("type") == "run":
                runs.append(record["run"])
            if record.get("type") == "history":
                item = record["history"]["item"]
                for key, value in item.items():
                    if not key.startswith("_"):
                        series.setdefault(key, []).append((item["_step"], value))
    return series, runs


def assert_matches(got: dict[str, list[tuple[int, float]]], expected: dict[str, dict[int, float]], what: str,
                   resumed: bool = False):
    for key, points in expected.items():
        assert key in got, f"{what} lacks {key}"
        steps = [s for s, _ in got[key]]
        assert steps == sorted(points), f"{what} {key}: steps {steps}, expected each of {sorted(points)} once"
        if resumed and key.startswith(("time/", "throughput/")):
            continue  # a step run twice (before the crash and after the resume) differs only in its timings
        for (step, value), want in zip(got[key], [points[s] for s in sorted(points)]):
            assert value == pytest.approx(want, rel=1e-6, abs=1e-6), f"{what} {key} at step {step}"


def check_backends(out: Path, expected_wandb_runs: int, resumed: bool = False):
    cell = out / LABEL
    expected = expected_series(cell)
    assert set(expected) >= {"reward/clean_mean", "eval/ID/arith_id/accuracy", "eval/OOD/arith_ood/accuracy"}
    assert sorted(expected["eval/ID/arith_id/accuracy"]) == [0, 2, 4]

    assert_matches(tensorboard_series(cell), expected, "tensorboard", resumed)

    state = json.loads((cell / "tracking.json").read_text())
    history, run = mlflow_series(out, state["mlflow"]["run_id"], expected)
    assert_matches(history, expected, "mlflow", resumed)
    assert run.info.run_name == LABEL and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["algo"] == "ppo"
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri()).get_experiment(run.info.experiment_id)
    assert experiment.name == out.name  # grouped by grid

    series, runs = wandb_series(cell)
    assert_matches(series, expected, "wandb", resumed)
    assert len(runs) == expected_wandb_runs
    assert {r["run_id"] for r in runs} == {state["wandb"]["run_id"]}  # one tracked run, resumed
    assert all(r["display_name"] == LABEL and r["run_group"] == out.name for r in runs)
    assert runs[0]["config"]["update"]["train"]["steps"] == STEPS


def test_every_backend_holds_the_metrics_and_eval_rows(tmp_path, cache_dir):
    out = tmp_path / "grid"
    assert main(run_args(out, cache_dir)) == 0
    check_backends(out, expected_wandb_runs=1)


def test_a_resumed_cell_continues_its_tracked_runs_without_duplicate_steps(tmp_path, cache_dir, monkeypatch):
    from harness.trainer import Trainer

    out = tmp_path / "grid"
    real_step = Trainer.train_step

    def crash_at_4(self, step):
        if step == 4:  # after step 3 was logged everywhere, past the checkpoint at step 2
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_4)
    assert main(run_args(out, cache_dir, "--workers", "1")) == 130  # the CLI's exit code for an interrupted run
    cell = out / LABEL
    assert [json.loads(line)["step"] for line in (cell / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(run_args(out, cache_dir, "--workers", "1")) == 0
    assert json.loads((cell / "status.json").read_text())["resumed_from"] == 2
    check_backends(out, expected_wandb_runs=2, resumed=True)


@pytest.mark.parametrize("text, message", [
    ("tensorboard,comet", "--log-to: unknown backend 'comet' (valid: tensorboard, wandb, mlflow)"),
    ("wandb,wandb", "--log-to lists a backend twice"),
])
def test_bad_backends_are_refused(text, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_backends(text)


def test_a_missing_backend_library_names_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(HarnessError, match=r"--log-to mlflow needs mlflow: pip install 'noise-robust-rl-harness\[mlflow\]'"):
        parse_backends("tensorboard,mlflow")
