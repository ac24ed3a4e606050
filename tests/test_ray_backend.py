"""`--backend ray --nproc 2`: a cell as a Ray Train `TorchTrainer` of 2 workers on a local Ray,
against the same cell started by torchrun (`--backend local --nproc 2`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.cli import main
from tests.conftest import fast_args

ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")

ARGS = ["run", "--algos", "ppo", "--noise", "flip0.3", "--seeds", "1", "--steps", "3", "--quiet", "--nproc", "2",
        *fast_args()]
TOLERANCE = 1e-6


def cell(out: Path) -> Path:
    return out / "arith" / "ppo" / "flip0.3" / "seed0"


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "throughput/"))}
            for line in (cell(out) / "metrics.jsonl").read_text().splitlines()]


def test_ray_backend_matches_torchrun(tmp_path, cache_dir):
    started = time.time()
    assert main([*ARGS, "--out", str(tmp_path / "local"), "--cache-dir", str(cache_dir)]) == 0
    local_s = time.time() - started
    try:
        assert main([*ARGS, "--backend", "ray", "--out", str(tmp_path / "ray"), "--cache-dir", str(cache_dir)]) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    ray_s = time.time() - started - local_s
    status = json.loads((cell(tmp_path / "ray") / "status.json").read_text())
    assert status["state"] == "done" and status["final_step"] == 3, status
    assert json.loads((cell(tmp_path / "ray") / "config.json").read_text())["train"]["nproc"] == 2
    assert not (cell(tmp_path / "ray") / ".ranks").exists()
    by_ray, by_torchrun = metrics(tmp_path / "ray"), metrics(tmp_path / "local")
    assert len(by_ray) == len(by_torchrun) == 3
    assert any(row["actor/grad_norm"] > 0 for row in by_torchrun)  # something to compare
    for a, b in zip(by_torchrun, by_ray):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    equal = by_ray == by_torchrun
    print(f"torchrun {local_s:.1f} s, ray {ray_s:.1f} s, metrics bitwise equal: {equal}")
