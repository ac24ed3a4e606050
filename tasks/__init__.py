"""Task suites: registry, problems and graders."""
from tasks import arith  # noqa: F401  (registers the suite)
from tasks.base import SUITES, Benchmark, Problem, Suite

__all__ = ["SUITES", "Benchmark", "Problem", "Suite"]
